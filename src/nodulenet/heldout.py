"""How well a model finds nodules on phantoms it never saw: generate, predict end to end, LUNA16 FROC/CPM.

The shipped demo model is trained on phantom seeds 100..135 and 3000..3043 (``configs/train_demo.sh``); this draws
phantoms from other seeds (default 1000..), writes them as NIfTI files exactly as a user would hand them to ``nodulenet
predict``, runs the full predict path (read, preprocess, network, mapping back, measurements) at a low threshold
so the FROC curve has candidates to rank, and scores the findings with the project's LUNA16 evaluation (a hit is a
finding centre closer than the nodule's radius). Used by ``benchmarks/demo_model_quality.py`` and the ``slow``
test ``tests/test_demo_model_quality.py``.

Outputs under ``out``: ``phantoms/phantom-<seed>/`` (scan + truth), ``predict/`` (predict's folders),
``candidates.csv``, ``annotations.csv``, ``seriesuids.csv`` (LUNA16 files, seriesuid = the scan's folder name),
``froc.json`` and ``froc.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from nodulenet.io.atomic import write_text_atomic
from nodulenet.io.luna_csv import LunaAnnotation, LunaCandidate, write_luna_annotations, write_luna_candidates

# The training phantoms of the demo model have 4 nodules each (configs/train_demo.sh); held-out ones too.
HELDOUT_NODULES_PER_PHANTOM = 4
# Low enough that the FROC curve reaches 8 false positives per scan on these small phantoms.
HELDOUT_THRESHOLD = 0.05


@dataclass
class HeldoutResult:
    """CPM and FROC of one model on one set of held-out phantoms."""

    seeds: list[int]
    cpm: float
    sensitivities_at: dict[str, float]
    n_nodules: int
    n_hits: int
    n_false_positives: int
    n_candidates: int
    seconds_per_scan: float
    out_dir: str
    failed: list[str]

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def evaluate_on_heldout_phantoms(out: str | Path, seeds: Sequence[int], *, weights: Path | None = None,
                                 threshold: float = HELDOUT_THRESHOLD, threads: int | None = None,
                                 progress: bool = False, ground_glass_style: str = "classic",
                                 precision: str = "auto") -> HeldoutResult:
    """Generate the phantoms of ``seeds`` (small chests, 4 nodules), predict them with ``weights`` (default: the
    shipped demo model) and return the LUNA16 CPM; every file it used stays under ``out``. ``ground_glass_style``
    "varied" draws their ground-glass nodules as real ones look (a harder set; "classic" is the reference one)."""
    import json

    from nodulenet.data.synthetic import SMALL_PHANTOM
    from nodulenet.evaluate.froc import FrocCandidate, FrocFinding, compute_froc
    from nodulenet.evaluate.plots import write_froc_outputs
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, Predictor, predict_scans
    from nodulenet.preprocess.phantom import write_phantom

    root = Path(out)
    phantom = replace(SMALL_PHANTOM, n_nodules=HELDOUT_NODULES_PER_PHANTOM, ground_glass_style=ground_glass_style)
    scans, truth = [], []
    for seed in seeds:
        folder = root / "phantoms" / f"phantom-{int(seed):05d}"
        if not (folder / "nodules.json").is_file():
            write_phantom(folder, int(seed), phantom, fmt="nii.gz")
        scans.append(folder / "scan.nii.gz")
        record = json.loads((folder / "nodules.json").read_text())
        truth.append(record["nodules"])

    options = PredictOptions(weights=weights, threshold=threshold, dicom_outputs=False, redo=True, threads=threads,
                             precision=precision)
    predictor = Predictor(options)
    run = predict_scans(scans, root / "predict", shard=Shard(rank=0, world_size=1, local_rank=0),
                        progress=progress, predictor=predictor)
    # Each scan's folder name is its seriesuid in the LUNA16 files (predict names folders after the scan).
    names = [r.name for r in run.results]
    candidates, nodules = [], []
    for result, nodules_of_scan in zip(run.results, truth):
        for f in result.findings:
            candidates.append(FrocCandidate(result.name, tuple(f["center_world_xyz_mm"]), float(f["score"])))
        for n in nodules_of_scan:
            nodules.append(FrocFinding(result.name, tuple(n["center_world_xyz_mm"]), float(n["diameter_mm"])))
    write_luna_candidates(root / "candidates.csv", [LunaCandidate(c.seriesuid, c.center_world_xyz_mm, c.probability)
                                                    for c in candidates])
    write_luna_annotations(root / "annotations.csv", [LunaAnnotation(n.seriesuid, n.center_world_xyz_mm,
                                                                     n.diameter_mm) for n in nodules])
    write_text_atomic(root / "seriesuids.csv", "".join(f"{n}\n" for n in names))
    froc = compute_froc(candidates, nodules, [], names, n_bootstrap=1000, seed=0)
    write_froc_outputs(froc, root)
    done = [r for r in run.results if r.status == "done"]
    return HeldoutResult(
        seeds=[int(s) for s in seeds], cpm=froc.cpm,
        sensitivities_at={str(k): v for k, v in froc.sensitivities_at.items()},
        n_nodules=froc.n_nodules, n_hits=froc.n_hits, n_false_positives=froc.n_false_positives,
        n_candidates=froc.n_candidates,
        seconds_per_scan=sum(r.seconds for r in done) / max(len(done), 1),
        out_dir=str(root), failed=[f"{r.scan}: {r.error}" for r in run.failed])
