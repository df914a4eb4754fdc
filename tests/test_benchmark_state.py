"""The benchmark's stage state (what --resume trusts) and the LUNA16 folds from the official subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodulenet.benchmark.luna16_api import find_luna_tree, luna_folds
from nodulenet.benchmark.state import open_state
from nodulenet.errors import InputError

SETTINGS = {"data_root": "/data/LUNA16", "folds": 10, "train": {"epochs": 200}, "workers": 4, "gpus": 1}


def test_state_survives_a_restart_and_refuses_other_settings(tmp_path: Path) -> None:
    state = open_state(tmp_path, "luna16", SETTINGS, resume=False)
    state.finish("prepare", seconds=12.5)
    state.finish("fold_0.train", steps=100)
    stored = json.loads((tmp_path / "benchmark_state.json").read_text())
    assert stored["stages"]["fold_0.train"]["steps"] == 100 and stored["dataset"] == "luna16"

    with pytest.raises(InputError, match="--resume"):
        open_state(tmp_path, "luna16", SETTINGS, resume=False)
    # Runtime settings may change on resume; what decides the results may not.
    resumed = open_state(tmp_path, "luna16", {**SETTINGS, "workers": 16, "gpus": 4}, resume=True)
    assert resumed.done("prepare") and resumed.done("fold_0.train") and not resumed.done("fold_0.predict")
    assert resumed.settings["workers"] == 16
    with pytest.raises(InputError, match=r"\['train'\]"):
        open_state(tmp_path, "luna16", {**SETTINGS, "train": {"epochs": 100}}, resume=True)
    with pytest.raises(InputError, match="not a lidc benchmark"):
        open_state(tmp_path, "lidc", SETTINGS, resume=True)


def _tree(root: Path, subsets: dict[int, list[str]]) -> Path:
    for n, uids in subsets.items():
        (root / f"subset{n}").mkdir(parents=True)
        for uid in uids:
            (root / f"subset{n}" / f"{uid}.mhd").write_text("")
    (root / "evaluationScript" / "annotations").mkdir(parents=True)
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    (root / "evaluationScript" / "annotations" / "annotations_excluded.csv").write_text("x\n")
    return root


def test_folds_are_the_official_subsets(tmp_path: Path) -> None:
    tree = find_luna_tree(_tree(tmp_path / "luna", {0: ["1.1", "1.2"], 1: ["2.1"], 2: ["3.1"], 3: ["4.1"]}))
    assert tree.excluded == tmp_path / "luna" / "evaluationScript" / "annotations" / "annotations_excluded.csv"
    assert tree.seriesuids is None
    folds = luna_folds(tree, 4)
    assert folds[0] == {"train": ["3.1", "4.1"], "val": ["2.1"], "test": ["1.1", "1.2"]}
    assert folds[3] == {"train": ["2.1", "3.1"], "val": ["1.1", "1.2"], "test": ["4.1"]}
    for fold in folds:  # every scan is tested exactly once, never trained on in its own fold
        assert not set(fold["test"]) & set(fold["train"] + fold["val"])
    assert sorted(u for f in folds for u in f["test"]) == ["1.1", "1.2", "2.1", "3.1", "4.1"]
    with pytest.raises(InputError, match="--folds 10 needs subset0 .. subset9"):
        luna_folds(tree, 10)


def test_a_tree_without_subsets_or_annotations_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no subset<N> folder"):
        find_luna_tree(tmp_path / "empty")
    root = tmp_path / "noann"
    (root / "subset0").mkdir(parents=True)
    with pytest.raises(InputError, match="no annotations.csv"):
        find_luna_tree(root)
