"""The ``nodulenet`` command as a user runs it: real subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path



def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodulenet", *args], capture_output=True, text=True, timeout=300)


def test_phantom_then_inspect_reports_its_geometry(tmp_path: Path):
    out = tmp_path / "ph"
    res = run_cli("phantom", str(out), "--seed", "5", "--n-nodules", "2", "--format", "nrrd")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(out / "annotations.csv")))
    assert len(rows) == 2 and all(float(r["diameter_mm"]) > 0 for r in rows)
    res = run_cli("inspect", str(out / "scan.nrrd"))
    assert res.returncode == 0, res.stderr
    assert "shape_zyx" in res.stdout and "(LPS)" in res.stdout


def test_bad_input_is_one_line_naming_the_file(tmp_path: Path):
    bogus = tmp_path / "scan.nii.gz"
    bogus.write_bytes(b"not an image at all")
    res = run_cli("inspect", str(bogus))
    assert res.returncode == 2
    assert str(bogus) in res.stderr and "Traceback" not in res.stderr
    res = run_cli("prepare-lidc", str(tmp_path), str(tmp_path / "out"), "--set", "no_such_setting=1")
    assert res.returncode == 2 and "no_such_setting" in res.stderr and "Traceback" not in res.stderr


def test_unreadable_set_value_is_one_error_line_in_every_command(tmp_path: Path):
    # prepare-lidc once let a yaml.parser.ParserError traceback through; train had its own parser.
    for args in (("prepare-lidc", str(tmp_path), str(tmp_path / "out")), ("train", "--out", str(tmp_path / "run"))):
        res = run_cli(*args, "--set", "lung.dilation_mm=[")
        assert res.returncode == 2, res.stderr
        message = " ".join(res.stderr.split())  # the console may wrap a long line
        assert message.startswith("error: --set lung.dilation_mm: cannot read the value '[' as YAML"), res.stderr
        assert "Traceback" not in res.stderr and "^" not in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_evaluate_froc_counts_a_perfect_half(tmp_path: Path, luna_root: Path):
    # Candidates on the first 100 official nodules (probability 1): sensitivity 100/1186 at every FP rate.
    ann = list(csv.DictReader(open(luna_root / "annotations.csv")))
    cand = tmp_path / "cand.csv"
    with open(cand, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "probability"])
        for r in ann[:100]:
            w.writerow([r["seriesuid"], r["coordX"], r["coordY"], r["coordZ"], 1.0])
    res = run_cli(
        "evaluate", "froc", str(cand), "--annotations", str(luna_root / "annotations.csv"),
        "--excluded", str(luna_root / "annotations_excluded.csv"), "--seriesuids", str(luna_root / "seriesuids.csv"),
        "-o", str(tmp_path / "froc"), "--bootstrap", "0",
    )
    assert res.returncode == 0, res.stderr
    assert f"CPM {100 / 1186:.4f}" in res.stdout
    assert (tmp_path / "froc" / "froc.json").exists() and (tmp_path / "froc" / "froc.png").exists()
