"""``nodulenet predict`` and ``nodulenet demo`` as functions: scan(s) in, result folders out.

One scan goes read -> preprocess -> network -> post-process -> export:

1. **read** (:func:`nodulenet.io.scan.read_scan`): a DICOM series, ``.mhd``, ``.nii[.gz]`` or ``.nrrd``;
2. **preprocess** (:func:`nodulenet.infer.prepare_input.prepare_input`): exactly the training preparation,
   with the :class:`PrepareConfig` recorded in the checkpoint (published defaults when it records none);
3. **network** (:func:`nodulenet.infer.network.run_network`): the whole scan in one pass padded to 16, or in
   overlapping tiles when it would not fit the memory budget; published post-processing;
4. **post-process**: detections scoring at least ``threshold`` become findings, mapped back to the ORIGINAL
   scan (:mod:`nodulenet.infer.mapping`: crop-local masks resampled onto the original grid) and measured
   (:mod:`nodulenet.export.measurements`: centre, box, diameters, volume, mean HU, side);
5. **export** (:func:`nodulenet.export.export_all`): ``nodules.json``, ``candidates.csv``, the label map, DICOM
   SEG + SR for DICOM input, ``report.html`` - all or nothing: a folder with ``nodules.json`` is complete.

A cohort (several scans, or a text file listing them) runs scan by scan under one loaded model; one failing
scan is reported and the rest go on. ``<out>/summary.json`` (``summary.rank<R>.json`` under torchrun) lists
every scan's status, timings and error; ``<out>/predict_config.json`` (``.rank<R>``) records the resolved
settings, model and preprocessing. Output folders: ``<out>/<scan name>/`` (:mod:`nodulenet.infer.cohort`).

This module sits above ``infer`` and ``export`` (which never import each other).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nodulenet
from nodulenet.errors import NoduleNetError
from nodulenet.infer.cohort import CohortItem, Shard, cohort_items, expand_scan_arguments, shard_from_environment
from nodulenet.io.atomic import ensure_output_folder, write_json_atomic
from nodulenet.io.findings import ModelInfo, NoduleFinding, ScanFindings, ScanSource, read_findings_json
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
# How many of the best detections scoring below the threshold nodules.json and the report list (apart, marked so):
# a reader who gets 0 findings sees what came closest (LIDC-IDRI-0002's ground-glass nodule scores 0.34).
BELOW_THRESHOLD_LISTED = 5
# Candidates-only output of one scan: the LUNA16 CSV, then candidates.json (written last: a folder holding it is
# complete; it records what made the candidates, for the skip rule).
CANDIDATES_CSV = "candidates.csv"
CANDIDATES_JSON = "candidates.json"


@dataclass(frozen=True)
class PredictOptions:
    """Settings of a prediction run (the CLI flags)."""

    weights: Path | None = None  # None: the shipped demo model
    device: str = "cpu"
    threshold: float = 0.5  # detections scoring at least this become findings (with masks)
    max_memory_gb: float | None = None  # CPU: limit for the whole process; CUDA: for the network on the GPU
    precision: str = "auto"  # "auto" (= fp32: bf16 changes detections, infer/network.resolve_precision), "fp32", "bf16",
    # "int8" (the backbone quantised in OpenVINO, infer/quantize.py)
    runtime: str = "auto"  # what runs the backbone: "auto" (= torch), "torch", "onnx" or "openvino"
    label_format: str = "nii.gz"
    dicom_outputs: bool = True  # DICOM SEG + SR for DICOM input
    redo: bool = False  # recompute scans whose complete output already matches this model and threshold
    # channels_last_3d memory format; None: on for CPU (15-25% faster fp32 on the AVX2 build machine, findings equal
    # to 1e-5 voxel / 3e-7 score), off for CUDA (not measured there).
    channels_last: bool | None = None
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    # DICOM: read this SeriesInstanceUID from the scan's folder (None: the series a reader would pick, logged)
    series_instance_uid: str | None = None
    # Candidates-only mode (nodulenet.infer.candidates): every detection, no mask head, no threshold; writes only
    # candidates.csv + candidates.json per scan. TTA and further models (an ensemble) need it.
    candidates_only: bool = False
    extra_weights: tuple[Path, ...] = ()  # more models beside ``weights``: their candidates are merged
    tta: str = "none"  # "none", "flips" (4 passes) or "flips8"
    merge: str = "wbf"  # how passes are merged: "wbf" (weighted box fusion) or "nms"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise NoduleNetError(f"--threshold must be a probability in [0, 1], got {self.threshold}")
        if self.max_memory_gb is not None and float(self.max_memory_gb) <= 0:
            raise NoduleNetError(f"--max-memory must be a positive number of GB, got {self.max_memory_gb}")
        if self.device.split(":")[0] not in DEVICES:
            raise NoduleNetError(f"--device must be cpu or cuda (or cuda:N), got {self.device!r}")
        if self.threads is not None and int(self.threads) < 1:
            raise NoduleNetError(f"--threads must be at least 1, got {self.threads}")
        from nodulenet.infer.candidates import MERGE_METHODS, tta_flips

        tta_flips(self.tta)  # raises for an unknown mode
        if self.merge not in MERGE_METHODS:
            raise NoduleNetError(f"--merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")
        if not self.candidates_only and (self.extra_weights or self.tta != "none"):
            raise NoduleNetError("--tta and several --weights need --candidates-only (a mask comes from one pass "
                                 "of one model; merged boxes have none)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = None if self.weights is None else str(self.weights)
        d["extra_weights"] = [str(w) for w in self.extra_weights]
        return d


@dataclass
class ScanResult:
    """What happened to one scan (one entry of ``summary.json``)."""

    index: int
    scan: str
    name: str
    status: str  # "done" | "skipped" (complete output already there) | "failed"
    out_dir: str
    n_findings: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)  # id, score, world centre, diameter, volume
    below_threshold: list[dict[str, Any]] = field(default_factory=list)  # the best few under the threshold
    error: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanPrediction:
    """:meth:`Predictor.predict_volume`'s result: the findings on the original grid and how they were made."""

    findings: ScanFindings
    stage_seconds: dict[str, float]
    details: dict[str, Any]


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _finding_summary(f: NoduleFinding) -> dict[str, Any]:
    return {"id": f.id, "score": round(f.score, 4), "center_world_xyz_mm": [round(v, 2) for v in f.center_world_xyz_mm],
            "diameter_mm": None if f.diameter_mm is None else round(f.diameter_mm, 2),
            "volume_mm3": None if f.volume_mm3 is None else round(f.volume_mm3, 1), "side": f.side,
            "site": f.site, "location": f.location_text,
            "centre_slice": None if f.centre_slice is None else f.centre_slice.to_dict()}


def output_is_complete(out_dir: Path, *, weights_sha256: str, config_sha256: str, threshold: float,
                       version: str) -> bool:
    """The skip rule of a rerun without ``--redo``: ``out_dir`` holds a complete export (its ``nodules.json``)
    made by this model (weights and config digests), threshold and nodulenet version. Used for local runs and,
    against the server's model, by ``predict --server``."""
    if not (out_dir / "nodules.json").is_file():
        return False
    try:
        previous = read_findings_json(out_dir / "nodules.json")
    except NoduleNetError:
        return False
    return (previous.model.weights_sha256 == weights_sha256 and previous.model.config_sha256 == config_sha256
            and previous.threshold == threshold and previous.nodulenet_version == version)


class Predictor:
    """A loaded model and the settings to run it; reusable across the scans of a cohort."""

    def __init__(self, options: PredictOptions | None = None, *, weights_dir: Path | None = None) -> None:
        from nodulenet.infer.network import resolve_precision
        from nodulenet.infer.runtimes import make_backbone, resolve_runtime
        from nodulenet.infer.weights import load_model

        import torch

        self.options = options or PredictOptions()
        if self.options.device.startswith("cuda") and not torch.cuda.is_available():
            raise NoduleNetError(f"--device {self.options.device}: no CUDA GPU is available to this PyTorch "
                                 f"({torch.__version__}); use --device cpu")
        if self.options.threads is not None:
            torch.set_num_threads(int(self.options.threads))
        self.loaded = load_model(self.options.weights, self.options.device, weights_dir=weights_dir)
        self.extra_loaded = [load_model(w, self.options.device) for w in self.options.extra_weights]
        for extra in self.extra_loaded:
            if extra.prepare_config != self.loaded.prepare_config:
                raise NoduleNetError(f"{extra.weights_path}: prepares scans differently from {self.loaded.weights_path}"
                                     f" (prepare settings differ), so their candidates cannot be merged")
        if self.options.runtime in ("onnx", "openvino") and self.options.precision == "auto":
            self.precision = "fp32"  # those runtimes run fp32 here (infer/runtimes.py)
        else:
            self.precision = resolve_precision(self.options.precision, self.options.device)
        self.runtime = resolve_runtime(self.options.runtime, self.options.device, self.precision)
        self.backbone = make_backbone(self.loaded.model, self.runtime, self.precision, self.options.device,
                                      self.loaded.prepare_config)
        self.channels_last = (self.options.channels_last if self.options.channels_last is not None
                              else not self.options.device.startswith("cuda"))
        for note in self.loaded.notes:
            logger.info(note)

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(name=f"NoduleNet ({self.loaded.name})", version=nodulenet.__version__,
                         weights_sha256=self.loaded.weights_sha256, config_sha256=self.loaded.config_sha256,
                         runtime=self.runtime, precision=self.precision)

    def describe(self) -> dict[str, Any]:
        """Everything that decides the results (written to ``predict_config.json``)."""
        return {
            "nodulenet_version": nodulenet.__version__,
            "options": self.options.to_dict(),
            "precision": self.precision,
            "runtime": self.runtime,
            "channels_last": self.channels_last,
            "model": {**self.model_info.to_dict(), "weights_path": str(self.loaded.weights_path),
                      "shipped": self.loaded.shipped, "notes": self.loaded.notes},
            "network_config": self.loaded.net_config.to_dict(),
            "prepare_config": self.loaded.prepare_config.to_dict(),
            "prepare_config_source": self.loaded.prepare_source,
        }

    def predict_volume(self, ct: Volume) -> ScanPrediction:
        """Findings of one scan in HU (steps 2-4 of the module docstring), on ``ct``'s own grid."""
        from nodulenet.export.measurements import finding_from_mask, patient_side
        from nodulenet.infer.mapping import map_detection
        from nodulenet.infer.network import run_network
        from nodulenet.infer.prepare_input import prepare_input
        from nodulenet.infer.tiling import MemoryBudgetError, network_memory_budget

        opts = self.options
        t0 = time.perf_counter()
        prepared = prepare_input(ct, self.loaded.prepare_config)
        t1 = time.perf_counter()
        budget = network_memory_budget(opts.device, opts.max_memory_gb)
        if opts.candidates_only:
            return self._predict_candidates(ct, prepared, budget, t0, t1)
        try:
            net = run_network(self.loaded.model, prepared.image, device=opts.device, precision=self.precision,
                              mask_threshold=opts.threshold, memory_budget_bytes=budget,
                              channels_last=self.channels_last, backbone=self.backbone, runtime=self.runtime)
        except MemoryBudgetError as exc:
            limit = f"--max-memory {opts.max_memory_gb} GB" if opts.max_memory_gb else "the memory available now"
            raise NoduleNetError(f"{limit} leaves too little for the network: {exc}") from None
        t2 = time.perf_counter()
        findings: list[NoduleFinding] = []
        below: list[NoduleFinding] = []
        n_without_mask = 0
        for box, score, probs, crop in zip(net.boxes, net.scores, net.masks, net.mask_boxes):
            if score < opts.threshold:  # scores are sorted: the rest are below too; the best few are listed apart
                if len(below) == BELOW_THRESHOLD_LISTED:
                    break
                mapped = map_detection(box, score, prepared.transform)
                below.append(NoduleFinding(
                    id=len(below) + 1, score=mapped.score, center_world_xyz_mm=mapped.center_world_xyz_mm,
                    center_zyx=mapped.center_zyx, box_zyx=mapped.box_zyx, side=patient_side(mapped.center_zyx, ct)))
                continue
            mapped = map_detection(box, score, prepared.transform, probs, crop)
            fid = len(findings) + 1
            if mapped.mask is not None:
                findings.append(finding_from_mask(fid, mapped.score, mapped.mask, ct))
            else:  # the mask fell between the original voxel centres (or no mask stage): the box still places it
                n_without_mask += 1
                findings.append(NoduleFinding(
                    id=fid, score=mapped.score, center_world_xyz_mm=mapped.center_world_xyz_mm,
                    center_zyx=mapped.center_zyx, box_zyx=mapped.box_zyx, side=patient_side(mapped.center_zyx, ct)))
        findings = self._locate(findings, ct, prepared)
        below = self._locate(below, ct, prepared)
        t3 = time.perf_counter()
        stages = {"preprocess_s": round(t1 - t0, 3), "network_s": round(t2 - t1, 3),
                  "postprocess_s": round(t3 - t2, 3)}
        details = {
            "preprocessed_shape_zyx": list(prepared.image.shape),
            "lung_volume_ml": round(prepared.lung_volume_ml, 1),
            "n_proposals": net.n_proposals,
            "n_detections": len(net),
            "n_findings_without_mask": n_without_mask,
            "tiles": len(net.tiles),
            "network_budget_gib": None if budget is None else round(budget / 2**30, 3),
            "precision": net.precision,
            "runtime": net.runtime,
            "preprocess_stage_seconds": prepared.stage_seconds,
            "orientation": prepared.transform.orientation_summary(),
        }
        result = ScanFindings(source=ScanSource.from_volume_meta(ct.meta), geometry=ct.geometry, findings=findings,
                              model=self.model_info, threshold=opts.threshold, timings=stages,
                              below_threshold=below, orientation=details["orientation"])
        return ScanPrediction(findings=result, stage_seconds=stages, details=details)

    @staticmethod
    def _locate(findings: list[NoduleFinding], ct: Volume, prepared: Any) -> list[NoduleFinding]:
        """Each finding's centre slice (DICOM image number) and site (lung, outside the lungs, bone)."""
        from nodulenet.export.measurements import locate_finding

        lungs = kept = None
        if prepared.lungs is not None and prepared.lungs_kept is not None:
            grid = prepared.transform.resampled
            lungs, kept = Volume.from_geometry(prepared.lungs, grid), Volume.from_geometry(prepared.lungs_kept, grid)
        return [locate_finding(f, ct, lungs, kept) for f in findings]

    def _predict_candidates(self, ct: Volume, prepared: Any, budget: float | None, t0: float, t1: float
                            ) -> ScanPrediction:
        """Candidates-only: every (merged) detection as a box-only finding, no mask head, threshold 0."""
        from nodulenet.export.measurements import patient_side
        from nodulenet.infer.candidates import detect_candidates
        from nodulenet.infer.mapping import map_detection

        opts = self.options
        models = [self.loaded.model, *(e.model for e in self.extra_loaded)]
        out = detect_candidates(models, prepared.image, tta=opts.tta, merge=opts.merge, device=opts.device,
                                precision=self.precision, memory_budget_bytes=budget,
                                channels_last=self.channels_last)
        t2 = time.perf_counter()
        findings = []
        for box, score in zip(out.boxes, out.scores):
            mapped = map_detection(box, float(score), prepared.transform)
            findings.append(NoduleFinding(
                id=len(findings) + 1, score=mapped.score, center_world_xyz_mm=mapped.center_world_xyz_mm,
                center_zyx=mapped.center_zyx, box_zyx=mapped.box_zyx, side=patient_side(mapped.center_zyx, ct)))
        stages = {"preprocess_s": round(t1 - t0, 3), "network_s": round(t2 - t1, 3),
                  "postprocess_s": round(time.perf_counter() - t2, 3)}
        details = {"preprocessed_shape_zyx": list(prepared.image.shape), "n_passes": out.n_passes,
                   "n_before_merge": out.n_before_merge, "pass_seconds": out.pass_seconds,
                   "n_detections": len(findings), "precision": self.precision}
        result = ScanFindings(source=ScanSource.from_volume_meta(ct.meta), geometry=ct.geometry, findings=findings,
                              model=self.model_info, threshold=0.0, timings=stages)
        return ScanPrediction(findings=result, stage_seconds=stages, details=details)

    def _write_candidates(self, findings: ScanFindings, out_dir: Path) -> Any:
        """``candidates.csv`` and, last, ``candidates.json``; shaped like :func:`export_all`'s result."""
        from types import SimpleNamespace

        from nodulenet.export.tables import candidates_seriesuid, write_candidates_csv

        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = write_candidates_csv(findings, out_dir / CANDIDATES_CSV)
        json_path = write_json_atomic(out_dir / CANDIDATES_JSON, {
            "identity": self.candidates_identity(), "seriesuid": candidates_seriesuid(findings),
            "n_candidates": len(findings.findings), "source": findings.source.to_dict(),
            "timings": findings.timings})
        return SimpleNamespace(files={"candidates_csv": csv_path, "candidates_json": json_path},
                               skipped={"masks": "candidates-only mode"})

    def candidates_identity(self) -> dict[str, Any]:
        """What decides a candidates-only result (compared by the skip rule; written to candidates.json)."""
        models = [self.loaded, *self.extra_loaded]
        return {"nodulenet_version": nodulenet.__version__, "weights_sha256": [m.weights_sha256 for m in models],
                "config_sha256": [m.config_sha256 for m in models], "tta": self.options.tta,
                "merge": self.options.merge if len(models) > 1 or self.options.tta != "none" else None}

    def is_complete(self, out_dir: Path) -> bool:
        """True when ``out_dir`` holds a complete export made with this model, threshold and version."""
        if self.options.candidates_only:
            import json

            try:
                done = json.loads((out_dir / CANDIDATES_JSON).read_text())
            except (OSError, ValueError):
                return False
            return (out_dir / CANDIDATES_CSV).is_file() and done.get("identity") == self.candidates_identity()
        return output_is_complete(out_dir, weights_sha256=self.loaded.weights_sha256,
                                  config_sha256=self.loaded.config_sha256, threshold=self.options.threshold,
                                  version=nodulenet.__version__)

    def predict_scan(self, item: CohortItem, out_root: Path) -> ScanResult:
        """Read, predict and export one scan into ``out_root/<name>``; errors are caught and reported."""
        from nodulenet.export import export_all
        from nodulenet.io.scan import read_scan

        out_dir = out_root / item.name
        result = ScanResult(index=item.index, scan=str(item.path), name=item.name, status="failed",
                            out_dir=str(out_dir))
        if not self.options.redo and self.is_complete(out_dir):
            result.status = "skipped"
            result.details["reason"] = "complete output from the same model and threshold already there"
            return result
        t0 = time.perf_counter()
        try:
            ct = read_scan(item.path, series_instance_uid=self.options.series_instance_uid)
            t_read = time.perf_counter() - t0
            prediction = self.predict_volume(ct)
            prediction.findings.timings["read_s"] = round(t_read, 3)
            t_export = time.perf_counter()
            if self.options.candidates_only:
                exported = self._write_candidates(prediction.findings, out_dir)
            else:
                exported = export_all(prediction.findings, ct, out_dir, label_format=self.options.label_format,
                                      dicom=self.options.dicom_outputs)
            t_end = time.perf_counter()
        except NoduleNetError as exc:
            result.error = str(exc)
        except MemoryError:
            result.error = ("out of memory: lower --max-memory to make the network run in smaller tiles, "
                            "or use a machine with more memory")
        except Exception as exc:  # noqa: BLE001 - one broken scan must not stop a cohort; the traceback is kept
            result.error = f"{type(exc).__name__}: {exc}"
            result.traceback = traceback.format_exc()
        else:
            result.status = "done"
            result.stage_seconds = {"read_s": round(t_read, 3), **prediction.stage_seconds,
                                    "export_s": round(t_end - t_export, 3)}
            result.n_findings = len(prediction.findings.findings)
            result.findings = [_finding_summary(f) for f in prediction.findings.findings]
            result.below_threshold = [_finding_summary(f) for f in prediction.findings.below_threshold]
            result.details = {**prediction.details, "files": {k: str(v) for k, v in exported.files.items()},
                              "skipped_outputs": dict(exported.skipped)}
        result.seconds = round(time.perf_counter() - t0, 3)
        result.peak_rss_mib = round(_peak_rss_mib(), 1)
        return result


@dataclass
class PredictRun:
    """Result of :func:`predict_scans`: one :class:`ScanResult` per scan of this process's shard."""

    out_dir: Path
    results: list[ScanResult]
    shard: Shard
    summary_path: Path
    config_path: Path

    @property
    def failed(self) -> list[ScanResult]:
        return [r for r in self.results if r.status == "failed"]


def _per_rank_name(stem: str, shard: Shard) -> str:
    """``<stem>.json``, or ``<stem>.rank<R>.json`` under torchrun so that ranks never write the same file."""
    return f"{stem}.rank{shard.rank}.json" if shard.is_distributed else f"{stem}.json"


def _device_for_shard(device: str, shard: Shard) -> str:
    """Under torchrun each process on a machine takes its own GPU (``cuda:LOCAL_RANK``)."""
    if device == "cuda" and shard.is_distributed:
        return f"cuda:{shard.local_rank}"
    return device


def predict_scans(scans: Sequence[str | Path], out_dir: str | Path, options: PredictOptions | None = None, *,
                  shard: Shard | None = None, progress: bool = False,
                  on_result: Callable[[ScanResult], None] | None = None,
                  weights_dir: Path | None = None, predictor: Predictor | None = None) -> PredictRun:
    """Predict every scan (scan lists expanded) of this process's shard into ``out_dir/<name>/``.

    ``shard`` defaults to the torchrun environment (``RANK``/``WORLD_SIZE``). Model and option problems raise
    before any scan is touched; a problem with one scan is recorded in its :class:`ScanResult` and the run goes
    on. ``summary.json`` is rewritten after every scan, so it is current even if the run is stopped.
    ``predictor`` reuses an already loaded model (its options win over ``options``).
    """
    from dataclasses import replace

    shard = shard or shard_from_environment()
    if predictor is None:
        options = options or PredictOptions()
        options = replace(options, device=_device_for_shard(options.device, shard))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NoduleNetError(f"{out}: the output path exists and is not a folder")
    items: list[CohortItem] = cohort_items(expand_scan_arguments(list(scans)), shard)
    if predictor is None:
        predictor = Predictor(options, weights_dir=weights_dir)
    ensure_output_folder(out)  # after the model: a model problem leaves no folder behind
    config_path = write_json_atomic(out / _per_rank_name("predict_config", shard), {
        **predictor.describe(), "shard": asdict(shard), "scans": [str(i.path) for i in items]})
    summary_path = out / _per_rank_name("summary", shard)
    results: list[ScanResult] = []

    def write_summary() -> None:
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        write_json_atomic(summary_path, {"nodulenet_version": nodulenet.__version__, "shard": asdict(shard),
                                         "n_scans": len(items), **counts,
                                         "scans": [r.to_dict() for r in results]})

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=len(items))
        for item in items:
            bar.update(task, description=item.name)
            result = predictor.predict_scan(item, out)
            results.append(result)
            write_summary()
            if on_result is not None:
                on_result(result)
            bar.advance(task)
    write_summary()
    return PredictRun(out_dir=out, results=results, shard=shard, summary_path=summary_path, config_path=config_path)


# ------------------------------------------------------------------------------------------------ demo


@dataclass
class DemoRun:
    """:func:`run_demo`'s result: the scan it used, the phantom's true nodules (None for a given scan)."""

    scan: Path
    truth: list[dict[str, Any]] | None
    run: PredictRun

    @property
    def result(self) -> ScanResult:
        return self.run.results[0]


def run_demo(out_dir: str | Path, scan: str | Path | None = None, *, seed: int = 0,
             options: PredictOptions | None = None, weights_dir: Path | None = None) -> DemoRun:
    """Predict one scan with the shipped model (``options.weights`` overrides it) and write every output.

    Without ``scan`` a phantom chest CT (seed ``seed``, :class:`PhantomConfig` defaults: 4 nodules of every kind)
    is written to ``<out>/phantom/`` with its ground truth (``annotations.csv``, ``nodules.json``) and used.
    The model is loaded first, so a missing shipped model is reported before any work.
    """
    import json

    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    out = Path(out_dir)
    predictor = Predictor(options or PredictOptions(), weights_dir=weights_dir)
    ensure_output_folder(out)
    truth = None
    if scan is None:
        paths = write_phantom(out / "phantom", seed, PhantomConfig(), fmt="nii.gz")
        scan = paths["scan"]
        truth = json.loads(Path(paths["nodules"]).read_text())["nodules"]
    run = predict_scans([scan], out, shard=Shard(rank=0, world_size=1, local_rank=0), predictor=predictor)
    return DemoRun(scan=Path(scan), truth=truth, run=run)
