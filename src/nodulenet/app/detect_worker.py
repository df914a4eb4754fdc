"""The viewer's local detection process: ``python -m nodulenet.app.detect_worker SCAN OUT [options]``.

It runs :func:`nodulenet.predict_api.predict_scans` on one scan (the same code, outputs and ``<OUT>/<name>/``
folder as ``nodulenet predict``) in its own process, so the window stays responsive and Cancel can stop it,
and reports on stdout as JSON lines (one object per line, flushed):

- ``{"event": "stage", "step": k, "total": 5, "text": "..."}`` when a stage starts (model, read, detect,
  write, done);
- ``{"event": "result", "result": {...}}``: the :class:`~nodulenet.predict_api.ScanResult` as a dict;
- ``{"event": "error", "message": "..."}``: a problem before any scan was touched (bad weights, options).

Exit code 0 when the scan is done (or its complete output was already there), 1 when it failed, 2 on an error
before it. SIGTERM (the viewer's Cancel) ends it through Python's normal unwinding, so the export's staging
folder is removed and no half-written ``nodules.json`` can appear. A log goes to ``<OUT>/detect.log``.
No Qt here: this process only imports what ``nodulenet predict`` imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("Loading the model", "Reading the scan", "Finding nodules", "Writing results", "Done")


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout (the viewer parses these; anything else it ignores)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def stage(step: int) -> None:
    logging.getLogger("nodulenet.app.detect").info("stage %d/%d: %s", step + 1, len(STAGES), STAGES[step])
    emit("stage", step=step + 1, total=len(STAGES), text=STAGES[step])


def _terminate(signum: int, frame: object) -> None:
    # Raise in the main thread: `finally` blocks (the export's staging clean-up) run before the process ends.
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nodulenet.app.detect_worker", description=__doc__.split("\n")[0])
    parser.add_argument("scan", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see nodulenet.commands.predict: idle threads must not spin
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=args.out / "detect.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("nodulenet.app.detect")
    log.info("detect %s -> %s (threshold %s, weights %s, device %s)", args.scan, args.out, args.threshold,
             args.weights or "shipped demo model", args.device)
    started = time.perf_counter()
    stage(0)
    from nodulenet.errors import NoduleNetError
    from nodulenet.infer.cohort import Shard
    from nodulenet.io.volume import Volume
    from nodulenet.predict_api import PredictOptions, Predictor, ScanPrediction, predict_scans

    class StagedPredictor(Predictor):
        """Reports the stages of :meth:`Predictor.predict_scan`: reading happens before predict_volume,
        writing after it returns."""

        def predict_volume(self, ct: Volume) -> ScanPrediction:
            stage(2)
            prediction = super().predict_volume(ct)
            stage(3)
            return prediction

    try:
        options = PredictOptions(weights=args.weights, device=args.device, threshold=args.threshold,
                                 threads=args.threads, redo=True)
        predictor = StagedPredictor(options)
        stage(1)
        run = predict_scans([args.scan], args.out, shard=Shard(rank=0, world_size=1, local_rank=0),
                            predictor=predictor)
    except NoduleNetError as exc:
        log.error("%s", exc)
        emit("error", message=str(exc))
        return 2
    result = run.results[0]
    if result.traceback:
        log.error("scan failed:\n%s", result.traceback)
    log.info("%s: %s in %.1f s (%d findings)", args.scan, result.status, time.perf_counter() - started,
             result.n_findings)
    emit("result", result=result.to_dict(), summary=str(run.summary_path))
    stage(4)
    return 1 if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
