"""Shared fixtures. Real LIDC-IDRI / LUNA16 files are found through ``NODULENET_TEST_DATA``
(default ``../shared/data`` beside the repository); tests that need them skip with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_data_root() -> Path:
    return Path(os.environ.get("NODULENET_TEST_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(
            f"{what} not found at {path}; set NODULENET_TEST_DATA to the folder holding LIDC-IDRI/ and LUNA16/"
        )
    return path


@pytest.fixture(scope="session")
def lidc_root() -> Path:
    """``<data>/LIDC-IDRI`` in TCIA layout (patients LIDC-IDRI-0001 and -0002)."""
    return _require(test_data_root() / "LIDC-IDRI", "real LIDC-IDRI test data")


@pytest.fixture(scope="session")
def luna_root() -> Path:
    """``<data>/LUNA16`` holding the official annotations.csv, annotations_excluded.csv, seriesuids.csv."""
    return _require(test_data_root() / "LUNA16", "official LUNA16 CSV files")


def _series_dir(lidc_root: Path, patient: str) -> Path:
    patient_dir = _require(lidc_root / patient, f"LIDC-IDRI patient {patient}")
    series = [p.parent for p in patient_dir.glob("*/*/*.xml")]
    if len(series) != 1:
        pytest.skip(f"expected one annotated series under {patient_dir}, found {len(series)}")
    return series[0]


@pytest.fixture(scope="session")
def lidc_0001_series(lidc_root: Path) -> Path:
    """The CT series folder (DICOM + XML) of LIDC-IDRI-0001."""
    return _series_dir(lidc_root, "LIDC-IDRI-0001")


@pytest.fixture(scope="session")
def lidc_0002_series(lidc_root: Path) -> Path:
    """The CT series folder (DICOM + XML) of LIDC-IDRI-0002."""
    return _series_dir(lidc_root, "LIDC-IDRI-0002")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small prepared phantom cases (seeds 1 and 3, ``phantom-00001``/``-00003``), made once per test run."""
    from nodulenet.data.synthetic import prepare_phantom_cases

    root = tmp_path_factory.getbasetemp() / "phantom_cases"
    prepare_phantom_cases(root, [1, 3])
    return root


@pytest.fixture
def one_torch_thread():
    """One torch (OpenMP) thread for the test: on the shared 2-core machine two threads spin-wait on each other's
    cores and small kernels run 3-10x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
