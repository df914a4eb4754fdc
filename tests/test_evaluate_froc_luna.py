"""The official LUNA16 annotation files load, and a perfect candidate list scores sensitivity 1 / CPM 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nodulenet.evaluate.froc import (
    evaluate_froc,
    read_findings_csv,
    read_seriesuids_csv,
)
from nodulenet.evaluate.plots import write_froc_outputs


def test_official_files_load(luna_root: Path) -> None:
    scans = read_seriesuids_csv(luna_root / "seriesuids.csv")
    nodules = read_findings_csv(luna_root / "annotations.csv")
    excluded = read_findings_csv(luna_root / "annotations_excluded.csv")
    assert len(scans) == 888 and len(set(scans)) == 888
    assert len(nodules) == 1186 and {n.seriesuid for n in nodules} <= set(scans)
    assert len(excluded) == 35192
    # Every scan ID is a clean DICOM UID (no CR left over from the CRLF line ends).
    assert all(uid.replace(".", "").isdigit() for uid in scans)


def test_annotation_centres_as_candidates_score_perfectly(luna_root: Path, tmp_path: Path) -> None:
    nodules = read_findings_csv(luna_root / "annotations.csv")
    candidates = tmp_path / "perfect.csv"
    candidates.write_text("seriesuid,coordX,coordY,coordZ,probability\n" + "".join(
        f"{n.seriesuid},{n.center_world_xyz_mm[0]!r},{n.center_world_xyz_mm[1]!r},{n.center_world_xyz_mm[2]!r},1\n"
        for n in nodules))
    r = evaluate_froc(candidates, luna_root / "annotations.csv", luna_root / "annotations_excluded.csv",
                      luna_root / "seriesuids.csv", n_bootstrap=10, seed=0)
    assert (r.n_scans, r.n_nodules, r.n_hits, r.n_false_positives) == (888, 1186, 1186, 0)
    assert all(s == 1.0 for s in r.sensitivities_at.values())
    assert r.cpm == 1.0
    assert np.all(r.sensitivities == 1.0)
    assert np.all(r.ci_low == 1.0) and np.all(r.ci_high == 1.0)
    out = write_froc_outputs(r, tmp_path / "out")
    assert out["json"].stat().st_size > 0 and out["png"].stat().st_size > 0
