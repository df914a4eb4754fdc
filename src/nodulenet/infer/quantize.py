"""int8 backbone: post-training quantisation in OpenVINO + NNCF, calibrated on phantoms, cached on disk.

Why OpenVINO + NNCF (``nncf.quantize`` on the OpenVINO model): both candidates quantise this all-``Conv3d``
backbone, but OpenVINO's int8 runs faster. Measured on the 2-core AVX512-VNNI/BF16 EPYC (no AMX), backbone on a
64 x 96 x 160 input, best of 2, random-init published size / shipped demo size: OpenVINO fp32 1.38 s / 0.07 s,
OpenVINO int8 (NNCF) 0.53 s / 0.02 s, PyTorch fp32 3.04 s / 0.68 s, PyTorch bf16 1.54 s / 0.04 s; in another run
ONNX Runtime fp32 3.46 s / 0.25 s and ONNX Runtime static QDQ int8 (per-channel weights, uint8 activations,
``quantize_static``) 1.31 s / 0.47 s (slower than its fp32 on the demo size).

Calibration: crops of phantoms from the project's seeded generator (:data:`CALIBRATION_SEEDS`: neither the demo
model's training seeds 100..135 / 3000..3043 nor the held-out 1000..1019; never real patients), centred on the
phantom's nodules and on random points, normalised exactly as the network input. The heads (RPN, RCNN, mask) stay
PyTorch fp32, as for every runtime.

Quality (``benchmarks/precision_check.py``, ``benchmarks/demo_model_quality.py --precisions``, shipped demo model):
held-out CPM 0.9607 as fp32 (78/80 hit; 61 false positives vs 57) on seeds 1000..1019, the same findings at 0.5 on
the phantoms (scores within 0.13, centres within 1.9 mm, mask Dice >= 0.82), but on LIDC-IDRI-0001 the real
nodule's centre moves by 7.4 mm (score 0.995 -> 0.967, Dice 0.93): int8 loses something, so it is an option
(``--precision int8``), never the default.

Cache: calibration and export take ~20-60 s, so the quantised model (OpenVINO IR, ``.xml`` + ``.bin``) is kept
under :func:`cache_dir` (``$NODULENET_CACHE_DIR``, else ``$XDG_CACHE_HOME/nodulenet``, else ``~/.cache/nodulenet``)
in a folder named by the sha256 of the backbone's weights, the recipe version and the OpenVINO/NNCF versions;
written to a temp folder and renamed, so a reader never sees half of one. A later predictor with the same weights
reads it back (well under a second).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.errors import NoduleNetError

logger = logging.getLogger(__name__)

# Seeds of the calibration phantoms: disjoint from the demo model's training seeds and from the held-out set.
CALIBRATION_SEEDS = (5000, 5001, 5002)
CROP_ZYX = (64, 96, 96)  # multiples of 16 (the backbone's stride); the phantom's lungs are ~160 x 95 x 165
RANDOM_CROPS_PER_PHANTOM = 4
# Full bias correction: on the demo model it cut the mean feature error vs fp32 from 11-27% (NNCF's fast
# correction) to 3-8% (24% on one decoder output) for ~5 s more; the MIXED preset did not help.
FAST_BIAS_CORRECTION = False
# Bump when the calibration recipe changes: cached models of an older recipe are not reused.
RECIPE_VERSION = 2


def cache_dir() -> Path:
    """Where quantised backbones are kept: ``$NODULENET_CACHE_DIR``, ``$XDG_CACHE_HOME/nodulenet`` or
    ``~/.cache/nodulenet``."""
    if os.environ.get("NODULENET_CACHE_DIR"):
        return Path(os.environ["NODULENET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nodulenet"


def backbone_sha256(feature_net: Any) -> str:
    """sha256 of the backbone's weights (names, shapes, dtypes and values, in state-dict order)."""
    digest = hashlib.sha256()
    for name, tensor in feature_net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _cache_folder(feature_net: Any, prepare_config: Any) -> Path:
    """The cache entry: weights digest, calibration settings (recipe, preparation) and the tools' versions."""
    import json

    import nncf
    import openvino as ov

    from nodulenet.preprocess.config import PrepareConfig

    prepare = json.dumps((prepare_config or PrepareConfig()).to_dict(), sort_keys=True)
    settings = (RECIPE_VERSION, CALIBRATION_SEEDS, CROP_ZYX, RANDOM_CROPS_PER_PHANTOM, FAST_BIAS_CORRECTION, prepare)
    recipe = hashlib.sha256(repr(settings).encode()).hexdigest()[:12]
    versions = f"ov{ov.__version__.split('-')[0]}-nncf{nncf.__version__}"
    return cache_dir() / "int8-backbone" / f"{backbone_sha256(feature_net)}-{recipe}-{versions}"


def _crop_at(image: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """A CROP_ZYX window of ``image`` around ``centre`` (inside the image where it fits, else zero-padded)."""
    size = np.asarray(CROP_ZYX)
    lo = np.clip(np.round(centre).astype(int) - size // 2, 0, np.maximum(np.asarray(image.shape) - size, 0))
    crop = image[tuple(slice(a, a + s) for a, s in zip(lo, size))]
    return np.pad(crop, [(0, s - d) for s, d in zip(size, crop.shape)])


def calibration_inputs(prepare_config: Any, in_channels: int = 1) -> list[np.ndarray]:
    """Network inputs ``[1, C, *CROP_ZYX]`` float32 from the calibration phantoms (nodules + random points)."""
    from nodulenet.infer.prepare_input import prepare_input
    from nodulenet.preprocess.phantom import PhantomConfig, make_phantom

    inputs = []
    rng = np.random.default_rng(0)
    for seed in CALIBRATION_SEEDS:
        phantom = make_phantom(seed, PhantomConfig())
        prepared = prepare_input(phantom.image, prepare_config)
        centres = [prepared.transform.world_to_preprocessed(n.center_world_xyz_mm) for n in phantom.nodules]
        centres += [rng.uniform(0, prepared.image.shape) for _ in range(RANDOM_CROPS_PER_PHANTOM)]
        for centre in centres:
            x = (_crop_at(prepared.image, np.asarray(centre, dtype=np.float64)).astype(np.float32) - 128.0) / 128.0
            inputs.append(np.repeat(x[None, None], in_channels, axis=1))
    return inputs


def _quantize(model: Any, prepare_config: Any, to_openvino: Callable[[Any], Any]) -> Any:
    """The backbone as an OpenVINO model with int8 convolutions (NNCF's default preset: symmetric)."""
    import nncf

    fp32 = to_openvino(model)
    inputs = calibration_inputs(prepare_config, model.config.in_channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(fp32, nncf.Dataset(inputs), subset_size=len(inputs),
                             fast_bias_correction=FAST_BIAS_CORRECTION)


def int8_openvino_model(model: Any, prepare_config: Any, to_openvino: Callable[[Any], Any]) -> tuple[Any, bool]:
    """(the int8 OpenVINO backbone, whether it came from the cache); calibrates and caches it on a miss.

    ``to_openvino``: the model's backbone -> fp32 OpenVINO model (:func:`.runtimes.openvino_model`)."""
    import openvino as ov

    folder = _cache_folder(model.feature_net, prepare_config)
    xml = folder / "backbone.xml"
    if xml.is_file() and (folder / "backbone.bin").is_file():
        try:
            return ov.Core().read_model(str(xml)), True
        except RuntimeError as exc:  # a damaged cache entry: rebuild it rather than fail the prediction
            logger.warning("int8 cache %s unreadable (%s); calibrating again", folder, exc)
    logger.info("int8: calibrating the backbone on %d phantoms (once per weights; cached in %s)",
                len(CALIBRATION_SEEDS), folder)
    quantized = _quantize(model, prepare_config, to_openvino)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            ov.save_model(quantized, str(tmp / "backbone.xml"), compress_to_fp16=False)
            if folder.exists():  # another process finished first, or a damaged entry: replace it
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a read-only or full cache must not stop the prediction
        logger.warning("int8: could not cache the quantised backbone in %s: %s", folder, exc)
    return quantized, False


def check_int8_available(device: str) -> None:
    """One clear line where int8 cannot run here (GPU, or openvino/nncf missing)."""
    if device.startswith("cuda"):
        raise NoduleNetError(f"--precision int8 runs on the CPU (OpenVINO): use --precision fp32 or bf16 with "
                             f"--device {device}")
    for package in ("openvino", "nncf"):
        try:
            __import__(package)
        except ImportError:
            raise NoduleNetError(f"--precision int8 needs the {package} package: "
                                 "pip install 'nodulenet[cpu-fast]'") from None
