"""``predict -o`` into a folder that cannot be made or written: one line naming the folder, exit code 2.

Each case was a raw ``NotADirectoryError`` / ``PermissionError`` traceback from ``predict_api.py`` before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodulenet.errors import OutputFolderError
from nodulenet.io.atomic import ensure_output_folder


def _predict(scan: Path, out: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodulenet", "predict", str(scan), "-o", out],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    folder = tmp_path_factory.mktemp("scan")
    return Path(write_phantom(folder, 7, PhantomConfig(n_nodules=1), fmt="nrrd")["scan"])


@pytest.mark.parametrize("case", ["path_is_a_file", "parent_is_a_file", "proc"])
def test_predict_into_an_impossible_folder_is_one_line(case: str, scan: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_text("a file, not a folder")
    out = {"path_is_a_file": str(occupied), "parent_is_a_file": str(occupied / "results"),
           "proc": "/proc/nodulenet-results"}[case]
    res = _predict(scan, out)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and out in " ".join(res.stderr.split()), res.stderr
    assert lines and lines[0].startswith("error:"), res.stderr
    assert occupied.read_text() == "a file, not a folder"  # nothing the user had is touched


@pytest.fixture
def read_only_parent():
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="nodulenet-ro-"))  # pytest's tmp_path sits under a 0700 folder
    top.chmod(0o755)
    parent = top / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    yield parent
    parent.chmod(0o755)
    shutil.rmtree(top, ignore_errors=True)


def test_read_only_parent_is_refused_before_any_work(read_only_parent: Path) -> None:
    target = read_only_parent / "results"
    expected = f"{target}: cannot create or write the output folder (Permission denied; at {target})"
    if os.geteuid() != 0:
        with pytest.raises(OutputFolderError) as err:
            ensure_output_folder(target)
        assert str(err.value) == expected
        return
    # root ignores folder modes: ask as an unprivileged user, the way a hospital service account would run it.
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is absent: cannot drop privileges")
    code = ("import sys; from nodulenet.io.atomic import ensure_output_folder; from nodulenet.errors import "
            "OutputFolderError\ntry: ensure_output_folder(sys.argv[1])\nexcept OutputFolderError as e: print(e); "
            "sys.exit(2)")
    src = Path(__file__).resolve().parents[1] / "src"
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
    env = {**os.environ, "PYTHONPATH": str(src), "HOME": str(read_only_parent.parent)}
    if subprocess.run([*as_nobody, "import nodulenet.io.atomic"], capture_output=True, env=env).returncode != 0:
        pytest.skip(f"an unprivileged user cannot read this checkout ({src}) to run the check")
    res = subprocess.run([*as_nobody, code, str(target)], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stdout.strip() == expected
    assert not target.exists()
