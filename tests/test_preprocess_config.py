"""PrepareConfig: published defaults, dict/YAML/JSON round trips, overrides, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodulenet.errors import InputError
from nodulenet.preprocess.config import LungMaskConfig, PrepareConfig, load_prepare_config


def test_defaults_are_the_published_noduleNet_settings() -> None:
    cfg = PrepareConfig()
    # uci-cbcl/NoduleNet utils/LIDC/preprocess.py: HU2uint8(-1200, 600), pad 170, bone_thred 210 with
    # remove_bone=False, 10 dilation iterations, lung box margin 5, resample to 1 mm; n_consensus = 3 with
    # the union of reader masks (cvrt_annos_to_npy.py).
    assert cfg.spacing_zyx_mm == (1.0, 1.0, 1.0)
    assert (cfg.hu_min, cfg.hu_max, cfg.pad_value) == (-1200.0, 600.0, 170)
    assert (cfg.remove_bone, cfg.bone_threshold) == (False, 210)
    assert cfg.crop_margin_voxels == 5
    assert (cfg.min_readers, cfg.consensus) == (3, "union")
    assert cfg.lung.dilation_mm == 10.0
    assert cfg.lung.convex_hull_max_area_ratio == 1.5
    assert cfg.lung.threshold_hu == -600.0


def test_dict_round_trip_and_json_compatible() -> None:
    cfg = PrepareConfig(min_readers=2, lung=LungMaskConfig(dilation_mm=5.0))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert PrepareConfig.from_dict(d) == cfg


def test_yaml_file_then_dotted_overrides(tmp_path: Path) -> None:
    path = tmp_path / "prep.yaml"
    path.write_text("min_readers: 1\nspacing_zyx_mm: 1.5\nlung:\n  threshold_hu: -500\n")
    cfg = load_prepare_config(path, {"lung.dilation_mm": 4, "consensus": "majority"})
    assert cfg.min_readers == 1
    assert cfg.spacing_zyx_mm == (1.5, 1.5, 1.5)  # one number = isotropic
    assert cfg.lung.threshold_hu == -500
    assert cfg.lung.dilation_mm == 4
    assert cfg.consensus == "majority"
    assert cfg.hu_min == -1200.0  # untouched defaults stay


def test_a_case_config_json_loads_back(tmp_path: Path) -> None:
    cfg = PrepareConfig(crop_margin_voxels=8)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"nodulenet_version": "0.1.0", "prepare": cfg.to_dict()}))
    assert load_prepare_config(path) == cfg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("min_reader: 2\n", "min_reader"),  # typo'd key is named
        ("lung:\n  treshold_hu: -500\n", "lung.treshold_hu"),
        ("consensus: all\n", "consensus"),
        ("hu_min: 700\n", "hu_max"),
        ("pad_value: 300\n", "pad_value"),
        ("[1, 2\n", "YAML"),
    ],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_prepare_config(path)
    assert info.value.path == path
    assert needle in str(info.value)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(InputError, match="lung.nope"):
        PrepareConfig().with_overrides({"lung.nope": 1})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_prepare_config(tmp_path / "absent.yaml")
