from pathlib import Path

import pytest

from nodulenet.errors import InputError
from nodulenet.io.config_files import read_config_file


def test_reads_yaml_json_and_a_runs_nested_section(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("min_readers: 2\nlung:\n  dilation_mm: 5\n")
    assert read_config_file(tmp_path / "a.yaml") == {"min_readers": 2, "lung": {"dilation_mm": 5}}
    (tmp_path / "config.json").write_text('{"nodulenet_version": "0.1.0", "prepare": {"min_readers": 4}}')
    assert read_config_file(tmp_path / "config.json", section="prepare") == {"min_readers": 4}
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize("name, text, problem", [
    ("bad.json", "{not json", "not valid JSON"),
    ("bad.yaml", "a: [1, 2", "not valid YAML"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, name: str, text: str, problem: str):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        read_config_file(tmp_path / name)
    assert str(tmp_path / name) in str(err.value)
    with pytest.raises(InputError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")


def test_dotted_overrides_set_nested_settings_and_refuse_typos():
    from nodulenet.io.config_files import apply_dotted_overrides

    settings = {"epochs": 200, "crop": {"size": 128}, "model_config": {}}
    apply_dotted_overrides(settings, {"epochs": 5, "crop.size": 64, "model_config.fpn": True}, "training",
                           open_sections=("model_config",))
    assert settings == {"epochs": 5, "crop": {"size": 64}, "model_config": {"fpn": True}}
    for bad in ({"epoch": 5}, {"crop.sise": 1}, {"nope.size": 1}):
        with pytest.raises(InputError, match="unknown training setting"):
            apply_dotted_overrides(dict(settings), bad, "training", open_sections=("model_config",))
