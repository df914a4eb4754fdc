"""What runs the backbone (infer/runtimes.py): bf16 and the ONNX Runtime / OpenVINO exports against PyTorch fp32.

Reference: today's path, PyTorch fp32 (``precision="fp32"``, ``runtime="torch"``), with the shipped demo model, on
a phantom and on LIDC-IDRI-0001. Tolerances, for every finding the reference reports with a score of at least
``REPORTED + SCORE_TOL`` (one that cannot fall below the threshold within the tolerance):

- bf16 (backbone only; native-bf16 CPUs only; ``auto`` is fp32): score within ``BF16_SCORE_TOL`` (0.06),
  centre within 0.5 mm, mask Dice >= 0.99; a detection within 0.06 of the threshold may come or go.
- ONNX Runtime / OpenVINO fp32: the same detections (score within 1e-4, centre within 0.01 mm, Dice >= 0.999).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodulenet.infer.network import NetworkOutput, bf16_supported, run_network
from nodulenet.infer.runtimes import make_backbone, resolve_runtime

REPORTED = 0.5
BF16_SCORE_TOL = 0.06
BF16_CENTRE_MM = 0.5
BF16_DICE = 0.99


@pytest.fixture(scope="module")
def demo() -> Any:
    from nodulenet.infer.weights import load_model

    return load_model(None)


def _prepared(scan: Any, demo: Any) -> np.ndarray:
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.io.scan import read_scan

    return prepare_input(read_scan(scan), demo.prepare_config).image


@pytest.fixture(scope="module")
def phantom_image(demo: Any, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    paths = write_phantom(tmp_path_factory.mktemp("phantom"), 0, PhantomConfig(), fmt="nii.gz")
    return _prepared(paths["scan"], demo)


@pytest.fixture(scope="module")
def lidc_image(demo: Any, lidc_0001_series: Path) -> np.ndarray:
    return _prepared(lidc_0001_series, demo)


def _dice(a: NetworkOutput, i: int, b: NetworkOutput, j: int) -> float:
    ka, kb = np.asarray(a.mask_boxes[i]), np.asarray(b.mask_boxes[j])
    lo, hi = np.minimum(ka[:3], kb[:3]), np.maximum(ka[3:], kb[3:])
    canvas = []
    for out, k, box in ((a, i, ka), (b, j, kb)):
        c = np.zeros(hi - lo, dtype=bool)
        c[tuple(slice(box[d] - lo[d], box[d + 3] - lo[d]) for d in range(3))] = out.masks[k] > 0.5
        canvas.append(c)
    total = canvas[0].sum() + canvas[1].sum()
    return float(2.0 * (canvas[0] & canvas[1]).sum() / total) if total else 1.0


def _compare(ref: NetworkOutput, new: NetworkOutput, score_tol: float, centre_mm: float, dice: float) -> int:
    """Every clearly reported reference finding has its counterpart in ``new`` within the tolerances."""
    centres_new = (new.boxes[:, :3] + new.boxes[:, 3:]) / 2.0
    checked = 0
    for i in np.flatnonzero(ref.scores >= REPORTED + score_tol):
        centre = (ref.boxes[i, :3] + ref.boxes[i, 3:]) / 2.0
        distance = np.linalg.norm(centres_new - centre, axis=1)  # 1 mm grid: voxels are mm
        j = int(distance.argmin())
        assert distance[j] <= centre_mm, (i, distance[j])
        assert abs(new.scores[j] - ref.scores[i]) <= score_tol, (i, ref.scores[i], new.scores[j])
        assert ref.masks[i] is not None and new.masks[j] is not None
        assert _dice(ref, i, new, j) >= dice, (i, _dice(ref, i, new, j))
        checked += 1
    return checked


def _run(model: Any, image: np.ndarray, precision: str = "fp32", backbone: Any = None) -> NetworkOutput:
    return run_network(model, image, precision=precision, mask_threshold=REPORTED, channels_last=True,
                       backbone=backbone)


needs_bf16 = pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16 (AVX512-BF16/AMX)")


def test_auto_precision_is_fp32_because_bf16_changes_detections() -> None:
    from nodulenet.infer.network import resolve_precision

    assert resolve_precision("auto", "cpu") == "fp32"


@needs_bf16
@pytest.mark.parametrize("case", ["phantom_image", "lidc_image"])
def test_bf16_keeps_the_fp32_findings_within_tolerance(demo: Any, case: str, request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(case)
    ref, new = _run(demo.model, image, "fp32"), _run(demo.model, image, "bf16")
    assert new.precision == "bf16"
    assert _compare(ref, new, BF16_SCORE_TOL, BF16_CENTRE_MM, BF16_DICE) >= 1


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_exported_runtimes_give_the_fp32_torch_detections(demo: Any, phantom_image: np.ndarray, runtime: str) -> None:
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[runtime])
    assert resolve_runtime(runtime, "cpu", "fp32") == runtime
    ref = _run(demo.model, phantom_image)
    new = _run(demo.model, phantom_image, backbone=make_backbone(demo.model, runtime, "fp32"))
    assert len(new) == len(ref)
    np.testing.assert_allclose(new.scores, ref.scores, atol=1e-4)
    np.testing.assert_allclose(new.boxes, ref.boxes, atol=0.01)
    assert _compare(ref, new, 1e-4, 0.01, 0.999) >= 3  # the phantom's clear nodules


def test_runtime_choices_are_checked() -> None:
    from nodulenet.errors import NoduleNetError

    assert resolve_runtime("auto", "cpu", "bf16") == "torch"
    with pytest.raises(NoduleNetError, match="--runtime must be one of auto, torch, onnx, openvino"):
        resolve_runtime("tensorrt", "cpu", "fp32")
    with pytest.raises(NoduleNetError, match="--runtime onnx runs fp32"):
        resolve_runtime("onnx", "cpu", "bf16")
    with pytest.raises(NoduleNetError, match="runs on the CPU"):
        resolve_runtime("openvino", "cuda", "fp32")
