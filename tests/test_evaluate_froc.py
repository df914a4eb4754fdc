"""LUNA16 FROC/CPM rules on hand-made cases; every expected number is derived by hand in the comments.

Scans are tiny: one nodule or a few, candidates placed at known distances (world x, y, z in mm).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.evaluate.froc import (
    CPM_FP_RATES,
    FrocCandidate,
    FrocFinding,
    compute_froc,
    evaluate_froc,
    froc_grid,
)
from nodulenet.evaluate.plots import write_froc_outputs

C, F = FrocCandidate, FrocFinding


def _froc(cands, nodules, scans, excluded=(), **kw):
    kw.setdefault("n_bootstrap", 0)
    return compute_froc(list(cands), list(nodules), list(excluded), list(scans), **kw)


def test_hit_needs_distance_strictly_below_radius() -> None:
    nodule = [F("A", (0.0, 0.0, 0.0), 10.0)]  # radius 5 mm, squared 25
    for xyz in [(5.0, 0.0, 0.0), (3.0, 4.0, 0.0), (0.0, 0.0, -5.0)]:  # squared distance exactly 25: a miss
        r = _froc([C("A", xyz, 0.9)], nodule, ["A"])
        assert (r.n_hits, r.n_false_positives) == (0, 1), xyz
    r = _froc([C("A", (4.99, 0.0, 0.0), 0.9)], nodule, ["A"])
    assert (r.n_hits, r.n_false_positives) == (1, 0)


def test_duplicates_on_one_nodule_are_neither_tp_nor_fp() -> None:
    # Three hits (0.9, 0.5, 0.2) on one nodule + one FP (0.7), one scan. Only the 0.9 hit counts:
    # ranked 0.9 TP, 0.7 FP -> raw points (FP/scan, sens) = (0,0), (0,1), (1,1). Had the two other hits been
    # FPs, the curve would reach 3 FPs per scan.
    cands = [C("A", (1, 0, 0), 0.9), C("A", (0, 1, 0), 0.5), C("A", (0, 0, 1), 0.2), C("A", (50, 0, 0), 0.7)]
    r = _froc(cands, [F("A", (0, 0, 0), 6.0)], ["A"])
    assert (r.n_hits, r.n_false_positives, r.n_ignored_duplicates) == (1, 1, 2)
    np.testing.assert_array_equal(r.raw_fps_per_scan, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(r.raw_sensitivities, [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(r.raw_thresholds[1:], [0.9, 0.7])
    assert r.cpm == 1.0


def test_candidates_on_excluded_findings_are_ignored() -> None:
    excluded = [F("A", (100, 0, 0), -1.0),  # no diameter: the script's 10 mm default, radius 5
                F("A", (0, 100, 0), 3.0)]   # its own diameter: radius 1.5
    cands = [C("A", (104.9, 0, 0), 0.8),   # inside the default radius: ignored
             C("A", (105.1, 0, 0), 0.6),   # outside it: FP
             C("A", (0, 102, 0), 0.5),     # 2 mm from a 3 mm finding: FP (default radius not used)
             C("A", (1, 0, 0), 0.4)]       # the nodule's hit
    r = _froc(cands, [F("A", (0, 0, 0), 8.0)], ["A"], excluded)
    assert (r.n_hits, r.n_false_positives, r.n_ignored_on_excluded) == (1, 2, 1)
    # Ranked: 0.6 FP, 0.5 FP, 0.4 TP -> cumulative (FP, TP) (1,0), (2,0), (2,1): no collinear triple among
    # these three (sklearn drops points before prepending (0,0)), so (0,0) (1,0) (2,0) (2,1). The ignored
    # 0.8 mark would otherwise have led the ranking.
    np.testing.assert_array_equal(r.raw_fps_per_scan, [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_array_equal(r.raw_sensitivities, [0.0, 0.0, 0.0, 1.0])


def test_one_candidate_inside_two_nodules_hits_both() -> None:
    # Overlapping nodules 3 mm apart, radius 5 each; the mark between them is a hit for both (script rule).
    nodules = [F("A", (0, 0, 0), 10.0), F("A", (3, 0, 0), 10.0)]
    r = _froc([C("A", (1.5, 0, 0), 0.7)], nodules, ["A"])
    assert (r.n_hits, r.n_false_positives, r.cpm) == (2, 0, 1.0)


def test_candidate_hitting_nodule_and_excluded_finding_stays_the_nodules_tp() -> None:
    r = _froc([C("A", (1, 0, 0), 0.9)], [F("A", (0, 0, 0), 6.0)], ["A"], [F("A", (2, 0, 0), -1.0)])
    assert (r.n_hits, r.n_false_positives, r.n_ignored_on_excluded) == (1, 0, 0)


def test_scan_without_candidates_counts_in_fp_divisor() -> None:
    # Scan A: nodule hit at 0.8 and FPs 0.6, 0.4. Scan B: a nodule, no candidate (missed). Scan C: nothing.
    # Ranked TP .8, FP .6, FP .4 -> counts (fp, tp) (0,1), (1,1), (2,1); the middle point is collinear and
    # dropped -> (0,0), (0,1), (2,1). FP/scan = count / 3 scans, sens = tp / 2 nodules.
    cands = [C("A", (0, 0, 0), 0.8), C("A", (50, 0, 0), 0.6), C("A", (90, 0, 0), 0.4)]
    nodules = [F("A", (0, 0, 0), 5.0), F("B", (0, 0, 0), 5.0)]
    r = _froc(cands, nodules, ["A", "B", "C"])
    np.testing.assert_allclose(r.raw_fps_per_scan, [0.0, 0.0, 2 / 3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.raw_sensitivities, [0.0, 0.5, 0.5], rtol=0, atol=1e-15)
    assert r.n_scans == 3 and r.sensitivity_ceiling == 0.5
    assert r.cpm == pytest.approx(0.5, abs=1e-12)
    assert [f.seriesuid for f in r.missed_nodules] == ["B"]


def test_tied_tp_and_fp_share_one_operating_point() -> None:
    # TP 0.5 tied with FP 0.5, then FP 0.3, one scan, one nodule. The tie is one point: (0,0) -> (1,1) ->
    # (2,1). So sensitivity rises along the diagonal: at 0.125 FP/scan it is 0.125, at 0.5 it is 0.5, from
    # 1 on it is 1. CPM = (0.125 + 0.25 + 0.5 + 1 + 1 + 1 + 1) / 7 = 4.875 / 7.
    cands = [C("A", (0, 0, 0), 0.5), C("A", (50, 0, 0), 0.5), C("A", (90, 0, 0), 0.3)]
    r = _froc(cands, [F("A", (0, 0, 0), 5.0)], ["A"])
    np.testing.assert_array_equal(r.raw_fps_per_scan, [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(r.raw_sensitivities, [0.0, 1.0, 1.0])
    expected_at = [0.125, 0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert [r.sensitivities_at[x] for x in CPM_FP_RATES] == pytest.approx(expected_at, abs=1e-12)
    assert r.cpm == pytest.approx(4.875 / 7, abs=1e-12)


def _three_scan_example():
    nodules = [F("A", (0, 0, 0), 10.0),    # n1, radius 5
               F("A", (100, 0, 0), 6.0),   # n2, radius 3
               F("B", (0, 0, 0), 8.0)]     # n3, radius 4
    excluded = [F("B", (50, 50, 50), -1.0)]  # radius 5 (default)
    cands = [
        C("A", (1, 0, 0), 0.9),       # n1 hit (d^2 = 1 < 25): TP 0.9
        C("A", (0, 2, 0), 0.6),       # n1 again: duplicate, ignored
        C("A", (200, 0, 0), 0.8),     # FP
        C("A", (100, 3, 0), 0.3),     # d^2 = 9 = r^2 of n2: not a hit -> FP, n2 missed
        C("B", (0, 0, 3), 0.5),       # n3 hit (9 < 16): TP 0.5
        C("B", (52, 50, 50), 0.95),   # on the excluded finding (4 < 25): ignored
        C("B", (300, 0, 0), 0.5),     # FP tied with the TP 0.5
        C("C", (0, 0, 0), 0.4),       # FP (scan C has no nodule)
        C("D", (0, 0, 0), 0.99),      # scan D is not listed: ignored
    ]
    return cands, nodules, excluded, ["A", "B", "C"]


def test_three_scan_example_by_hand() -> None:
    # FROC entries: TPs 0.9 (n1), 0.5 (n3); n2 missed; FPs 0.8, 0.5, 0.4, 0.3. 3 nodules, 3 scans.
    # Ranked by probability, cumulative (FP, TP) after each distinct value:
    #   0.9 -> (0,1); 0.8 -> (1,1); 0.5 (TP and FP tied) -> (2,2); 0.4 -> (3,2); 0.3 -> (4,2).
    # Collinear point (3,2) dropped; (0,0) prepended: (0,0) (0,1) (1,1) (2,2) (4,2).
    # FP/scan = FP / 3, sens = TP / 3:  x = 0, 0, 1/3, 2/3, 4/3;  y = 0, 1/3, 1/3, 2/3, 2/3.
    # Interpolated: 1/8 and 1/4 lie on the flat part (1/3); 1/2 is on the rising segment
    # from (1/3, 1/3) to (2/3, 2/3) -> 1/2; 1, 2, 4, 8 are at or past 4/3 -> 2/3 (the ceiling, n2 missed).
    # CPM = (1/3 + 1/3 + 1/2 + 4 * 2/3) / 7 = (23/6) / 7 = 23/42.
    cands, nodules, excluded, scans = _three_scan_example()
    r = _froc(cands, nodules, scans, excluded)
    assert (r.n_scans, r.n_nodules, r.n_hits, r.n_false_positives) == (3, 3, 2, 4)
    assert (r.n_ignored_duplicates, r.n_ignored_on_excluded, r.n_ignored_unlisted_scan) == (1, 1, 1)
    assert r.n_candidates == 8
    np.testing.assert_allclose(r.raw_fps_per_scan, [0, 0, 1 / 3, 2 / 3, 4 / 3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.raw_sensitivities, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3], rtol=0, atol=1e-15)
    expected_at = [1 / 3, 1 / 3, 1 / 2, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    assert [r.sensitivities_at[x] for x in CPM_FP_RATES] == pytest.approx(expected_at, abs=1e-12)
    assert r.cpm == pytest.approx(23 / 42, abs=1e-12)
    assert r.sensitivity_ceiling == pytest.approx(2 / 3)
    assert r.sensitivities.max() == pytest.approx(2 / 3)  # never above the ceiling
    # The curve lives on the script's grid, linspace(1/8, 8, 10001).
    assert r.fps_per_scan.shape == (10001,) and r.fps_per_scan[0] == 0.125 and r.fps_per_scan[-1] == 8.0
    # NoduleNet-repo reading (first raw point at or beyond each rate): 1/3, 1/3, then 2/3 five times -> 4/7.
    assert r.cpm_first_reached == pytest.approx(4 / 7, abs=1e-12)


def test_nodules_never_hit_give_zero_sensitivity() -> None:
    r = _froc([C("A", (50, 0, 0), 0.9)], [F("A", (0, 0, 0), 5.0), F("A", (9, 9, 9), 5.0)], ["A"])
    assert r.n_hits == 0 and r.cpm == 0.0 and r.sensitivity_ceiling == 0.0
    assert not r.sensitivities.any()


def test_mark_cap_keeps_only_probabilities_above_the_next_one() -> None:
    # Cap 3, probabilities 0.9, 0.8, 0.7 (the nodule's hit), 0.7, 0.6: the 4th largest is 0.7, and only
    # marks strictly above it stay -> 0.9 and 0.8; the tied 0.7 hit is dropped, so the nodule is missed.
    cands = [C("A", (0, 0, 0), 0.7), C("A", (50, 0, 0), 0.9), C("A", (60, 0, 0), 0.8),
             C("A", (70, 0, 0), 0.7), C("A", (80, 0, 0), 0.6)]
    nodule = [F("A", (0, 0, 0), 5.0)]
    capped = _froc(cands, nodule, ["A"], max_marks_per_scan=3)
    assert (capped.n_candidates, capped.n_dropped_by_mark_cap, capped.n_hits) == (2, 3, 0)
    uncapped = _froc(cands, nodule, ["A"], max_marks_per_scan=0)
    assert (uncapped.n_candidates, uncapped.n_hits) == (5, 1)


def test_bootstrap_is_seeded_and_matches_an_explicit_resample() -> None:
    cands, nodules, excluded, scans = _three_scan_example()
    a = _froc(cands, nodules, scans, excluded, n_bootstrap=50, seed=7)
    b = _froc(cands, nodules, scans, excluded, n_bootstrap=50, seed=7)
    c = _froc(cands, nodules, scans, excluded, n_bootstrap=50, seed=8)
    np.testing.assert_array_equal(a.ci_low, b.ci_low)
    np.testing.assert_array_equal(a.ci_high, b.ci_high)
    np.testing.assert_array_equal(a.bootstrap_mean, b.bootstrap_mean)
    # With 3 scans the percentile bounds often coincide across seeds; the bootstrap mean does not.
    assert not np.array_equal(a.bootstrap_mean, c.bootstrap_mean)

    # One resample: the CI bounds are that resample's curve. Rebuild the resample by hand as a data set
    # whose scans are copies of the drawn ones (same draws: default_rng(seed).integers(0, 3, size=3)).
    seed = 3
    drawn = np.random.default_rng(seed).integers(0, 3, size=3)  # [2, 0, 0]: scan C once, scan A twice
    copies = [f"{scans[i]}#{k}" for k, i in enumerate(drawn)]
    copy_cands = [C(f"{s}#{k}", c.center_world_xyz_mm, c.probability)
                  for k, i in enumerate(drawn) for s in [scans[i]] for c in cands if c.seriesuid == s]
    copy_nods = [F(f"{s}#{k}", n.center_world_xyz_mm, n.diameter_mm)
                 for k, i in enumerate(drawn) for s in [scans[i]] for n in nodules if n.seriesuid == s]
    copy_excl = [F(f"{s}#{k}", n.center_world_xyz_mm, n.diameter_mm)
                 for k, i in enumerate(drawn) for s in [scans[i]] for n in excluded if n.seriesuid == s]
    one = _froc(cands, nodules, scans, excluded, n_bootstrap=1, seed=seed)
    assert one.n_bootstrap_used == 1 and len(copy_nods) == 4
    direct = _froc(copy_cands, copy_nods, copies, copy_excl)
    np.testing.assert_array_equal(one.ci_low, direct.sensitivities.astype(np.float32))
    np.testing.assert_array_equal(one.ci_high, direct.sensitivities.astype(np.float32))


def test_bootstrap_interval_contains_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    scans = [f"s{i}" for i in range(30)]
    nodules, cands = [], []
    for s in scans:
        for _ in range(rng.integers(0, 3)):
            centre = tuple(rng.uniform(-100, 100, 3))
            nodules.append(F(s, centre, 8.0))
            if rng.random() < 0.8:
                cands.append(C(s, centre, float(rng.uniform(0.3, 1.0))))
        for _ in range(rng.integers(0, 12)):
            cands.append(C(s, tuple(rng.uniform(-100, 100, 3)), float(rng.uniform(0.0, 0.9))))
    r = _froc(cands, nodules, scans, n_bootstrap=300, seed=1)
    assert r.n_bootstrap_used == 300
    assert np.all(r.ci_low <= r.ci_high)
    tol = 1e-6  # the CI is stored in float32, as in the script
    assert np.all(r.ci_low <= r.sensitivities + tol) and np.all(r.sensitivities <= r.ci_high + tol)
    assert r.cpm_ci[0] <= r.cpm <= r.cpm_ci[1]
    assert r.ci_high.max() > r.ci_low.min()  # a real spread, not a degenerate band


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_files_and_outputs(tmp_path: Path) -> None:
    cands, nodules, excluded, scans = _three_scan_example()
    cand_csv = _write(tmp_path / "c.csv", "seriesuid,coordX,coordY,coordZ,probability\n" + "".join(
        f"{c.seriesuid},{c.center_world_xyz_mm[0]},{c.center_world_xyz_mm[1]},{c.center_world_xyz_mm[2]},"
        f"{c.probability}\n" for c in cands))
    # Columns in another order, CRLF line ends, extra column: all accepted.
    ann_csv = _write(tmp_path / "a.csv", "diameter_mm,seriesuid,coordX,coordY,coordZ,note\r\n" + "".join(
        f"{n.diameter_mm},{n.seriesuid},{n.center_world_xyz_mm[0]},{n.center_world_xyz_mm[1]},"
        f"{n.center_world_xyz_mm[2]},x\r\n" for n in nodules))
    exc_csv = _write(tmp_path / "e.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nB,50,50,50,-1\n")
    uid_csv = _write(tmp_path / "s.csv", "A\r\nB\r\n\r\nC\r\n")
    r = evaluate_froc(cand_csv, ann_csv, exc_csv, uid_csv, n_bootstrap=20, seed=0)
    assert r.cpm == pytest.approx(23 / 42, abs=1e-12) and r.n_scans == 3
    paths = write_froc_outputs(r, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {"fps_per_scan", "sensitivities", "cpm", "ci_low", "ci_high"} <= set(data)
    assert data["cpm"] == pytest.approx(23 / 42, abs=1e-12)
    assert len(data["fps_per_scan"]) == len(data["ci_low"]) == 10001
    assert data["sensitivities_at"]["0.5"] == pytest.approx(0.5)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["froc.json", "froc.png"]  # no temp files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seriesuid,coordX,coordY,probability\nA,1,2,0.5\n", "line 1: missing column(s) coordZ"),
        ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,3,0.5\nA,1,abc,3,0.5\n", "line 3: coordY is not a number"),
        ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2\n", "line 2: only 3 values"),
        ("seriesuid,coordX,coordY,coordZ,probability\nA,1,2,3,nan\n", "line 2: probability is not finite"),
        ("", "empty file"),
    ],
)
def test_bad_candidate_csv_names_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    ann = _write(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,5\n")
    exc = _write(tmp_path / "e.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    uids = _write(tmp_path / "s.csv", "A\n")
    bad = _write(tmp_path / "cands.csv", text)
    with pytest.raises(InputError) as err:
        evaluate_froc(bad, ann, exc, uids, n_bootstrap=0)
    assert err.value.path == bad and message in str(err.value)


def test_seriesuids_rules(tmp_path: Path) -> None:
    ann = _write(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,5\n")
    exc = _write(tmp_path / "e.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    cands = _write(tmp_path / "c.csv", "seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,0.5\nB,0,0,9,0.4\n")
    dup = _write(tmp_path / "dup.csv", "A\nB\nA\n")
    with pytest.raises(InputError, match="line 3: series UID A already listed on line 1"):
        evaluate_froc(cands, ann, exc, dup, n_bootstrap=0)
    with_header = _write(tmp_path / "h.csv", "seriesuid\nA\nB\n")  # header skipped: 2 scans, not 3
    assert evaluate_froc(cands, ann, exc, with_header, n_bootstrap=0).n_scans == 2
    no_nodule = _write(tmp_path / "b.csv", "B\n")
    with pytest.raises(InputError, match="no nodule on any of the 1 scans"):
        evaluate_froc(cands, ann, exc, no_nodule, n_bootstrap=0)
    with pytest.raises(InputError, match="file not found"):
        evaluate_froc(tmp_path / "missing.csv", ann, exc, with_header, n_bootstrap=0)


def test_in_memory_api_rejects_empty_inputs() -> None:
    with pytest.raises(ValueError, match="at least one scan"):
        _froc([], [F("A", (0, 0, 0), 5.0)], [])
    with pytest.raises(ValueError, match="no nodule"):
        _froc([C("A", (0, 0, 0), 0.5)], [], ["A"])


def test_grid_is_the_scripts() -> None:
    grid = froc_grid()
    assert grid.size == 10001 and grid[0] == 0.125 and grid[-1] == 8.0
    assert np.allclose(np.diff(grid), 7.875 / 10000)
