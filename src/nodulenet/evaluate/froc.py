"""FROC and CPM exactly as the LUNA16 challenge's ``noduleCADEvaluationLUNA16.py`` computes them.

Conventions: every position is a world coordinate (DICOM patient LPS, millimetres) ordered ``(x, y, z)``,
as in LUNA16's ``annotations.csv``; diameters are in millimetres. No voxel coordinates appear here.

What the official script does, and this module replicates (each rule is also commented where it is coded):

1. Only scans listed in ``seriesuids.csv`` take part; candidates and annotations of other scans are ignored
   (the script loops over that list only). A listed scan without candidates still counts in the FP divisor.
2. ``maxNumberOfCADMarks = 100``: in a scan with more than 100 candidates, only those with a probability
   *strictly greater* than the 101st largest one are kept, so candidates tied with it are all dropped.
3. A candidate hits a finding when its squared distance to the finding's centre is *strictly less* than
   ``(diameter_mm / 2)^2``; a finding with a negative diameter (``-1`` in annotations_excluded.csv) gets a
   10 mm diameter.
4. Per included nodule only its highest-probability hit enters the FROC as a true positive; its other hits
   are removed (neither TP nor FP). A candidate hitting two nodules is a hit for both.
5. Candidates hitting an excluded finding (and no included nodule) are removed: neither TP nor FP.
6. A nodule with no hit enters as a positive that can never be reached, so the curve's sensitivity tops out
   at hits / nodules (the "sensitivity ceiling").
7. The curve is scikit-learn's ``roc_curve`` (tied probabilities collapse into one operating point,
   collinear points dropped, (0, 0) prepended), scaled to FPs per scan (FPs / number of listed scans) and to
   sensitivity over all nodules; when no candidate is an FP, every FP rate is 0.
8. The curve is interpolated linearly (``np.interp``) on ``linspace(0.125, 8, 10001)``; the CPM is the mean
   sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FPs per scan on that interpolated curve.
9. Confidence intervals: bootstrap over scans (draw ``n`` scans with replacement, keep each drawn scan's
   FROC entries, divisor stays ``n``), interpolate every resampled curve, then per FP rate take the sorted
   values at ``floor(0.025 n_boot)`` and ``floor(0.975 n_boot)`` (float32, as the script stores them).

Where the script would crash or return NaN, this module does something defined instead (documented at the
spot): no nodule hit -> sensitivity 0 (the script divides 0/0); a bootstrap resample without any nodule is
skipped (sensitivity undefined); the CI is evaluated on the curve's 10001-point grid (the script uses a
10000-point one for the CI only); the bootstrap is seeded (the script uses NumPy's global generator).

Extras the script does not compute: an interval for the CPM itself (same resamples, same percentile rule)
and ``cpm_first_reached``, the sensitivity at the first raw operating point with at least each FP rate, which
is how the published NoduleNet code reads its FROC table (for comparing with the paper's numbers).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.errors import InputError

FROC_GRID_MIN_FPS = 0.125
FROC_GRID_MAX_FPS = 8.0
FROC_GRID_POINTS = 10001  # the script's grid for the curve it plots and reads the CPM from
CPM_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS_PER_SCAN = 100  # noduleCADEvaluation() passes maxNumberOfCADMarks=100
DEFAULT_DIAMETER_MM = 10.0  # used by the script for findings whose diameter is negative (-1)
MISSED_NODULE_SCORE = -1_000_000_000.0  # the script's "minProbValue" for nodules without a hit
CONFIDENCE = 0.95


@dataclass(frozen=True)
class FrocCandidate:
    """One CAD mark: the scan it belongs to, its centre in world (x, y, z) mm, and its probability."""

    seriesuid: str
    center_world_xyz_mm: tuple[float, float, float]
    probability: float


@dataclass(frozen=True)
class FrocFinding:
    """One reference finding (a nodule of annotations.csv or an entry of annotations_excluded.csv)."""

    seriesuid: str
    center_world_xyz_mm: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class FrocEntries:
    """The script's FROC vectors: one row per counted TP, per missed nodule and per FP, all scans together.

    ``is_nodule`` is FROCGTList, ``score`` FROCProbList, ``missed`` excludeList (a missed nodule is kept out
    of the ROC but counts as a lesion), ``scan_index`` FPDivisorList as an index into the scan list.
    """

    is_nodule: np.ndarray
    score: np.ndarray
    missed: np.ndarray
    scan_index: np.ndarray


@dataclass
class FrocResult:
    """FROC curve on the script's grid, CPM, bootstrap CI and the counts behind them."""

    fps_per_scan: np.ndarray
    sensitivities: np.ndarray
    cpm: float
    sensitivities_at: dict[float, float]
    ci_low: np.ndarray | None
    ci_high: np.ndarray | None
    n_scans: int
    n_nodules: int
    n_hits: int
    n_false_positives: int
    n_candidates: int
    bootstrap_mean: np.ndarray | None = None
    cpm_ci: tuple[float, float] | None = None
    n_bootstrap: int = 0
    n_bootstrap_used: int = 0
    seed: int = 0
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN
    n_ignored_on_excluded: int = 0
    n_ignored_duplicates: int = 0
    n_ignored_unlisted_scan: int = 0
    n_dropped_by_mark_cap: int = 0
    raw_fps_per_scan: np.ndarray = field(default_factory=lambda: np.zeros(1))
    raw_sensitivities: np.ndarray = field(default_factory=lambda: np.zeros(1))
    raw_thresholds: np.ndarray = field(default_factory=lambda: np.full(1, np.inf))
    sensitivities_at_first_reached: dict[float, float] = field(default_factory=dict)
    cpm_first_reached: float = 0.0
    missed_nodules: list[FrocFinding] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def sensitivity_ceiling(self) -> float:
        return self.n_hits / self.n_nodules if self.n_nodules else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary; the curve keys come first, then the rest (counts, settings, raw points)."""

        def floats(values: np.ndarray | None) -> list[float] | None:
            return None if values is None else [float(v) for v in values]

        return {
            "fps_per_scan": floats(self.fps_per_scan),
            "sensitivities": floats(self.sensitivities),
            "cpm": self.cpm,
            "ci_low": floats(self.ci_low),
            "ci_high": floats(self.ci_high),
            "sensitivities_at": {_rate_key(r): s for r, s in self.sensitivities_at.items()},
            "cpm_ci": None if self.cpm_ci is None else list(self.cpm_ci),
            "bootstrap_mean": floats(self.bootstrap_mean),
            "sensitivity_ceiling": self.sensitivity_ceiling,
            **{name: getattr(self, name) for name in _COUNT_FIELDS},
            "settings": {
                "n_bootstrap": self.n_bootstrap,
                "n_bootstrap_used": self.n_bootstrap_used,
                "seed": self.seed,
                "confidence": CONFIDENCE,
                "max_marks_per_scan": self.max_marks_per_scan,
                "grid": [FROC_GRID_MIN_FPS, FROC_GRID_MAX_FPS, FROC_GRID_POINTS],
                "protocol": "LUNA16 noduleCADEvaluationLUNA16.py",
            },
            # The NoduleNet repository reads each rate off the raw curve (first point with FPs >= rate);
            # reported so numbers can be compared with its paper.
            "sensitivities_at_first_reached": {
                _rate_key(r): s for r, s in self.sensitivities_at_first_reached.items()
            },
            "cpm_first_reached": self.cpm_first_reached,
            "raw_curve": {
                "fps_per_scan": floats(self.raw_fps_per_scan),
                "sensitivities": floats(self.raw_sensitivities),
                # +inf (the (0, 0) point) has no JSON form: written as null.
                "thresholds": [None if not math.isfinite(t) else float(t) for t in self.raw_thresholds],
            },
            "missed_nodules": [
                {"seriesuid": f.seriesuid, "center_world_xyz_mm": list(f.center_world_xyz_mm),
                 "diameter_mm": f.diameter_mm}
                for f in self.missed_nodules
            ],
            "sources": dict(self.sources),
        }


_COUNT_FIELDS = ("n_scans", "n_nodules", "n_hits", "n_false_positives", "n_candidates", "n_ignored_on_excluded",
                 "n_ignored_duplicates", "n_ignored_unlisted_scan", "n_dropped_by_mark_cap")


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


# ----------------------------------------------------------------------------------------------- CSV input


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, row) pairs of a comma-separated file; blank lines are skipped."""
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        # newline="" lets the csv module handle CRLF (the official LUNA16 files use it); utf-8-sig drops a BOM.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if len(row) > 1 or (row and row[0].strip())]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read as CSV: {exc}") from exc
    if not rows:
        raise InputError(path, "empty file (a header line is required)")
    header = [cell.strip() for cell in rows[0][1]]
    return header, rows[1:]


def _columns(path: Path, header: list[str], wanted: Sequence[str]) -> list[int]:
    missing = [name for name in wanted if name not in header]
    if missing:
        raise InputError(path, f"line 1: missing column(s) {', '.join(missing)}; the header is {','.join(header)}")
    return [header.index(name) for name in wanted]


def _number(path: Path, line: int, row: list[str], index: int, name: str) -> float:
    if index >= len(row):
        raise InputError(path, f"line {line}: only {len(row)} values, column '{name}' is missing")
    try:
        value = float(row[index])
    except ValueError:
        raise InputError(path, f"line {line}: {name} is not a number: {row[index]!r}") from None
    if not math.isfinite(value):
        raise InputError(path, f"line {line}: {name} is not finite: {row[index]!r}")
    return value


_XYZ = ("coordX", "coordY", "coordZ")


def _records(path: Path, value_name: str) -> list[tuple[str, float, float, float, float]]:
    """(seriesuid, x, y, z, value) per data row, ``value_name`` being probability or diameter_mm."""
    header, rows = _read_table(path)
    names = (*_XYZ, value_name)
    uid_col, *cols = _columns(path, header, ("seriesuid", *names))
    out = []
    for line, row in rows:
        try:  # fast path; on any problem the slow path below says which value on which line
            values = [float(row[i]) for i in cols]
            ok = math.isfinite(values[0] + values[1] + values[2] + values[3])  # NaN/inf propagate
        except (ValueError, IndexError):
            ok = False
        if not ok:
            values = [_number(path, line, row, i, n) for i, n in zip(cols, names)]
        out.append((row[uid_col].strip(), values[0], values[1], values[2], values[3]))
    return out


def read_candidates_csv(path: str | Path) -> list[FrocCandidate]:
    """LUNA-style CAD marks: columns seriesuid, coordX, coordY, coordZ, probability (any order, extras ok)."""
    return [FrocCandidate(uid, (x, y, z), p) for uid, x, y, z, p in _records(Path(path), "probability")]


def read_findings_csv(path: str | Path) -> list[FrocFinding]:
    """annotations.csv / annotations_excluded.csv: seriesuid, coordX, coordY, coordZ, diameter_mm."""
    return [FrocFinding(uid, (x, y, z), d) for uid, x, y, z, d in _records(Path(path), "diameter_mm")]


def read_seriesuids_csv(path: str | Path) -> list[str]:
    """The scan list: first column of each line, no header (official file), order kept.

    Deviation (documented): a first line reading ``seriesuid`` is taken as a header and skipped, where the
    script would count it as one more scan; a duplicate UID is an error, where the script would count that
    scan's nodules and FPs twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row[0].strip()) for row in reader if row and row[0].strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read as CSV: {exc}") from exc
    if rows and rows[0][1] == "seriesuid":
        rows = rows[1:]
    seen: dict[str, int] = {}
    for line, uid in rows:
        if uid in seen:
            raise InputError(path, f"line {line}: series UID {uid} already listed on line {seen[uid]}")
        seen[uid] = line
    if not rows:
        raise InputError(path, "no series UIDs listed")
    return [uid for _, uid in rows]


# ------------------------------------------------------------------------------------------------- matching


@dataclass
class FrocMatchCounts:
    """What matching did with the candidates and nodules of the listed scans (the script's counters)."""

    n_candidates: int = 0
    n_hits: int = 0
    n_false_positives: int = 0
    n_ignored_on_excluded: int = 0
    n_ignored_duplicates: int = 0
    n_ignored_unlisted_scan: int = 0
    n_dropped_by_mark_cap: int = 0
    n_nodules: int = 0
    missed: list[FrocFinding] = field(default_factory=list)

    def result_fields(self) -> dict[str, Any]:
        """These counts as :class:`FrocResult` keyword arguments (``missed`` is its ``missed_nodules``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["missed_nodules"] = values.pop("missed")
        return values


def _apply_mark_cap(probs: np.ndarray, max_marks: int) -> np.ndarray:
    """Boolean keep-mask of the script's maxNumberOfCADMarks rule (see module doc, rule 2)."""
    if max_marks <= 0 or probs.size <= max_marks:
        return np.ones(probs.size, dtype=bool)
    threshold = np.sort(probs)[::-1][max_marks]
    # Strictly greater: candidates tied with the (max_marks+1)-th probability are all dropped, so a scan
    # may keep fewer than max_marks marks. At most max_marks values can exceed it, so the script's extra
    # "stop at max_marks" check never triggers.
    return probs > threshold


def _hit_matrix(centers: np.ndarray, diameters: np.ndarray, cand_xyz: np.ndarray) -> np.ndarray:
    """(findings, candidates) booleans: squared distance strictly below the squared radius (rule 3)."""
    radius_sq = np.array([math.pow((d if d >= 0.0 else DEFAULT_DIAMETER_MM) / 2.0, 2.0) for d in diameters])
    d = centers[:, None, :] - cand_xyz[None, :, :]
    # Same arithmetic as the script: ((dx^2 + dy^2) + dz^2) < r^2 in float64, no square root.
    dist_sq = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
    return dist_sq < radius_sq[:, None]


def _group(items: Sequence[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for item in items:
        grouped.setdefault(item.seriesuid, []).append(item)
    return grouped


def match_candidates(
    candidates: Sequence[FrocCandidate],
    nodules: Sequence[FrocFinding],
    excluded: Sequence[FrocFinding],
    seriesuids: Sequence[str],
    *,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
) -> tuple[FrocEntries, FrocMatchCounts]:
    """Build the script's FROC vectors (TPs, missed nodules, FPs) scan by scan, in seriesuids order."""
    scans = list(seriesuids)
    if not scans or len(set(scans)) != len(scans):
        raise ValueError("seriesuids must list at least one scan, each once")
    listed = set(scans)
    cands_by_scan, nods_by_scan, excl_by_scan = _group(candidates), _group(nodules), _group(excluded)
    counts = FrocMatchCounts()
    # Rule 1: candidates of scans outside the list never enter the analysis.
    counts.n_ignored_unlisted_scan = sum(len(v) for k, v in cands_by_scan.items() if k not in listed)
    is_nodule: list[np.ndarray] = []
    score: list[np.ndarray] = []
    missed: list[np.ndarray] = []
    scan_index: list[np.ndarray] = []
    for index, uid in enumerate(scans):
        scan_cands = cands_by_scan.get(uid, [])
        probs = np.array([c.probability for c in scan_cands], dtype=np.float64)
        xyz = np.array([c.center_world_xyz_mm for c in scan_cands], dtype=np.float64).reshape(-1, 3)
        keep = _apply_mark_cap(probs, max_marks_per_scan)
        counts.n_dropped_by_mark_cap += int(probs.size - keep.sum())
        probs, xyz = probs[keep], xyz[keep]
        counts.n_candidates += int(probs.size)

        scan_nodules = nods_by_scan.get(uid, [])
        counts.n_nodules += len(scan_nodules)
        used = np.zeros(probs.size, dtype=bool)  # removed from the FP pool (the script's candidates2)
        tp_scores: list[float] = []
        n_missed = 0
        if scan_nodules:
            hits = _hit_matrix(
                np.array([n.center_world_xyz_mm for n in scan_nodules], dtype=np.float64),
                np.array([n.diameter_mm for n in scan_nodules], dtype=np.float64), xyz)
            for nodule, row in zip(scan_nodules, hits):
                if row.any():
                    # Rule 4: the best hit is the TP; other hits are dropped (counted as ignored
                    # duplicates); a candidate already used by another nodule still counts here.
                    tp_scores.append(float(probs[row].max()))
                    counts.n_ignored_duplicates += int(row.sum()) - 1
                else:
                    n_missed += 1
                    counts.missed.append(nodule)
            used |= hits.any(axis=0)
        scan_excluded = excl_by_scan.get(uid, [])
        if scan_excluded:
            on_excluded = _hit_matrix(
                np.array([e.center_world_xyz_mm for e in scan_excluded], dtype=np.float64),
                np.array([e.diameter_mm for e in scan_excluded], dtype=np.float64), xyz).any(axis=0)
            # Rule 5: the script looks at excluded findings after the included ones, so a candidate on
            # both was already taken by the nodule and is not counted as ignored here.
            counts.n_ignored_on_excluded += int((on_excluded & ~used).sum())
            used |= on_excluded
        fp_scores = probs[~used]
        counts.n_hits += len(tp_scores)
        counts.n_false_positives += int(fp_scores.size)
        # Entry order inside a scan (TPs/missed in nodule order, then FPs) does not change the curve:
        # roc_curve sorts by score and merges ties.
        n_tp, n_fp = len(tp_scores), int(fp_scores.size)
        is_nodule.append(np.r_[np.ones(n_tp + n_missed, dtype=bool), np.zeros(n_fp, dtype=bool)])
        score.append(np.r_[np.array(tp_scores), np.full(n_missed, MISSED_NODULE_SCORE), fp_scores])
        missed.append(np.r_[np.zeros(n_tp, dtype=bool), np.ones(n_missed, dtype=bool),
                            np.zeros(n_fp, dtype=bool)])
        scan_index.append(np.full(n_tp + n_missed + n_fp, index, dtype=np.int64))
    entries = FrocEntries(np.concatenate(is_nodule), np.concatenate(score).astype(np.float64),
                          np.concatenate(missed), np.concatenate(scan_index))
    return entries, counts


# ----------------------------------------------------------------------------------------------- the curve


class _RankedEntries:
    """The ROC-eligible entries (TPs and FPs, not missed nodules) sorted once by descending score.

    Sorting once lets every bootstrap resample reuse the order: a resample only changes how many times each
    scan's entries occur (a weight), never their order. Entries with equal scores form one run (one ROC
    point, as scikit-learn's ``_binary_clf_curve`` merges ties), so the order inside a run does not matter.
    """

    def __init__(self, entries: FrocEntries) -> None:
        eligible = ~entries.missed
        order = np.argsort(-entries.score[eligible], kind="stable")
        self.score = entries.score[eligible][order]
        self.is_nodule = entries.is_nodule[eligible][order]
        self.scan_index = entries.scan_index[eligible][order]
        self.missed_scan_index = entries.scan_index[entries.missed]
        self.run_start = np.r_[0, np.nonzero(np.diff(self.score))[0] + 1] if self.score.size else np.zeros(0, int)
        self.run_end = np.r_[self.run_start[1:] - 1, self.score.size - 1] if self.score.size else np.zeros(0, int)


def _roc_points(ranked: _RankedEntries, weight: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cumulative (fps, tps, thresholds) as sklearn's roc_curve(drop_intermediate=True) builds them.

    ``weight`` is how many times each ranked entry occurs (0 for entries of scans left out of a bootstrap
    resample); a run made only of absent entries is no point at all, as if those entries were not there.
    """
    present_run = np.add.reduceat(weight, ranked.run_start) > 0 if ranked.run_start.size else np.zeros(0, bool)
    ends = ranked.run_end[present_run]
    tps = np.cumsum(weight * ranked.is_nodule)[ends].astype(np.float64)
    fps = np.cumsum(weight * ~ranked.is_nodule)[ends].astype(np.float64)
    thresholds = ranked.score[ends]
    if fps.size > 2:
        # sklearn drops points where neither cumulative count changes slope (collinear points).
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    return np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thresholds]


def _froc_curve(
    ranked: _RankedEntries, n_scans: int, scan_weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The script's computeFROC: (fps per scan, sensitivity, thresholds); None if no nodule is present."""
    if scan_weight is None:
        weight = np.ones(ranked.score.size, dtype=np.int64)
        n_missed = ranked.missed_scan_index.size
    else:
        weight = scan_weight[ranked.scan_index]
        n_missed = int(scan_weight[ranked.missed_scan_index].sum())
    n_detected = int(weight @ ranked.is_nodule)
    n_false = int(weight.sum()) - n_detected
    n_lesions = n_detected + n_missed
    if n_lesions == 0:
        return None
    fps_count, tps_count, thresholds = _roc_points(ranked, weight)
    if n_false == 0:
        # The script's border case ("this system has no false positives"): every FP rate is 0.
        fps = np.zeros(fps_count.size)
    else:
        # Same operations as the script: fpr * (candidates - detected) / scans, with fpr = FP count / total.
        fpr = fps_count / fps_count[-1]
        fps = fpr * float(n_false) / n_scans
    if n_detected == 0:
        # Deviation: sklearn's tpr would be 0/0 = NaN here; with no hit the sensitivity is 0 everywhere.
        sens = np.zeros(tps_count.size)
    else:
        tpr = tps_count / tps_count[-1]
        sens = (tpr * float(n_detected)) / float(n_lesions)
    return fps, sens, thresholds


def froc_grid() -> np.ndarray:
    """The script's FP-rate grid for the plotted (and CPM) curve: linspace(0.125, 8, 10001)."""
    return np.linspace(FROC_GRID_MIN_FPS, FROC_GRID_MAX_FPS, num=FROC_GRID_POINTS)


def _first_reached(fps: np.ndarray, sens: np.ndarray, rate: float) -> float:
    """Sensitivity of the last raw point at the smallest FP rate >= ``rate`` (the NoduleNet repo's rule).

    Where the curve never reaches ``rate`` that code fails; here the curve's last point (its ceiling) is used.
    """
    reached = np.nonzero(fps >= rate)[0]
    if reached.size == 0:
        return float(sens[-1])
    first = fps[reached].min()
    return float(sens[np.nonzero(fps == first)[0][-1]])


def _bootstrap(
    ranked: _RankedEntries, n_scans: int, grid: np.ndarray, n_bootstrap: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float], int] | None:
    """The script's computeFROC_bootstrap + compute_mean_ci, resampling scans with replacement."""
    curves: list[np.ndarray] = []
    cpms: list[float] = []
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, n_scans, size=n_scans)
        curve = _froc_curve(ranked, n_scans, np.bincount(drawn, minlength=n_scans))
        if curve is None:
            continue  # Deviation: no nodule in this resample, sensitivity undefined (script: NaN/crash).
        fps, sens, _ = curve
        # float32 storage as in the script (its interp_sens array is float32).
        curves.append(np.interp(grid, fps, sens).astype(np.float32))
        cpms.append(float(np.mean(np.interp(np.asarray(CPM_FP_RATES), fps, sens))))
    if not curves:
        return None
    stacked = np.sort(np.stack(curves), axis=0)
    n_used = stacked.shape[0]
    tail = (1.0 - CONFIDENCE) / 2.0
    low_i, high_i = int(math.floor(tail * n_used)), int(math.floor((1.0 - tail) * n_used))
    cpm_sorted = np.sort(np.asarray(cpms))
    cpm_ci = (float(cpm_sorted[low_i]), float(cpm_sorted[high_i]))
    mean = stacked.mean(axis=0, dtype=np.float64)
    return stacked[low_i].copy(), stacked[high_i].copy(), mean, cpm_ci, n_used


# -------------------------------------------------------------------------------------------------- the API


def compute_froc(
    candidates: Sequence[FrocCandidate],
    nodules: Sequence[FrocFinding],
    excluded: Sequence[FrocFinding],
    seriesuids: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """In-memory LUNA16 FROC/CPM (for ``nodulenet predict`` and training validation; pass n_bootstrap=0
    there for speed). Raises ValueError when the listed scans hold no nodule (sensitivity undefined)."""
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be >= 0")
    scans = list(seriesuids)
    entries, counts = match_candidates(candidates, nodules, excluded, scans, max_marks_per_scan=max_marks_per_scan)
    ranked = _RankedEntries(entries)
    curve = _froc_curve(ranked, len(scans))
    if curve is None:
        raise ValueError("no nodule annotation on the listed scans: sensitivity is undefined")
    fps, sens, thresholds = curve
    grid = froc_grid()
    at = {rate: float(np.interp(rate, fps, sens)) for rate in CPM_FP_RATES}
    first = {rate: _first_reached(fps, sens, rate) for rate in CPM_FP_RATES}
    result = FrocResult(
        fps_per_scan=grid,
        sensitivities=np.interp(grid, fps, sens),
        cpm=float(np.mean(list(at.values()))),
        sensitivities_at=at,
        ci_low=None,
        ci_high=None,
        n_scans=len(scans),
        n_bootstrap=n_bootstrap,
        seed=seed,
        max_marks_per_scan=max_marks_per_scan,
        raw_fps_per_scan=fps,
        raw_sensitivities=sens,
        raw_thresholds=thresholds,
        sensitivities_at_first_reached=first,
        cpm_first_reached=float(np.mean(list(first.values()))),
        **counts.result_fields(),
    )
    if n_bootstrap > 0:
        boot = _bootstrap(ranked, len(scans), grid, n_bootstrap, np.random.default_rng(seed))
        if boot is not None:
            result.ci_low, result.ci_high, result.bootstrap_mean, result.cpm_ci, result.n_bootstrap_used = boot
    return result


def evaluate_froc(
    candidates_csv: str | Path,
    annotations_csv: str | Path,
    excluded_csv: str | Path,
    seriesuids_csv: str | Path,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    max_marks_per_scan: int = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """LUNA16 FROC/CPM of a candidates CSV against the official annotation files (see module doc)."""
    paths = {name: Path(p) for name, p in (("candidates", candidates_csv), ("annotations", annotations_csv),
                                            ("annotations_excluded", excluded_csv), ("seriesuids", seriesuids_csv))}
    scans = read_seriesuids_csv(paths["seriesuids"])
    candidates = read_candidates_csv(paths["candidates"])
    nodules = read_findings_csv(paths["annotations"])
    excluded = read_findings_csv(paths["annotations_excluded"])
    listed = set(scans)
    if not any(n.seriesuid in listed for n in nodules):
        raise InputError(paths["annotations"], f"no nodule on any of the {len(scans)} scans listed in "
                                               f"{paths['seriesuids']}: sensitivity is undefined")
    result = compute_froc(candidates, nodules, excluded, scans, n_bootstrap=n_bootstrap, seed=seed,
                          max_marks_per_scan=max_marks_per_scan)
    result.sources = {name: str(p) for name, p in paths.items()}
    return result
