"""What runs the backbone during prediction: PyTorch (fp32 or bf16), ONNX Runtime or OpenVINO (fp32 or int8).

The backbone (the 3-D U-Net, ``model.feature_net``) is nearly all of the network's time; the RPN, RCNN and mask
heads always run in PyTorch fp32 (:meth:`nodulenet.model.NoduleNet.predict` takes the backbone as a callable). The
other runtimes run the SAME weights: the backbone is exported from the loaded model when the predictor is made
(ONNX through ``torch.onnx.export``, OpenVINO through its PyTorch front end), nothing is read from disk.

Measured (``benchmarks/predict_speed.py --backbone-check 96``: published-size backbone on 96 x 208 x 272 of
LIDC-IDRI-0001's network input, the runtimes interleaved in one process, 2-core AVX512-BF16 EPYC shared with other
jobs, best of 2): PyTorch fp32 (``channels_last_3d``) 29.9 s; ONNX Runtime fp32 21.5 s (1.39x); OpenVINO fp32
15.8 s (1.89x); PyTorch bf16 12.2 s (2.44x). ONNX Runtime and OpenVINO give the PyTorch fp32 features to ~1e-6
relative, bf16 to ~1e-2. Their export runs once per predictor (4 s for ONNX, 17 s for OpenVINO there): for the
demo-size network (a ~3 s backbone) it costs more than it saves, for the published size it pays off from the first
scan. Measured again in a later session, same command, a different 2-core AVX512-BF16/VNNI EPYC: PyTorch fp32
15.5 s; ONNX Runtime fp32 17.0 s (0.91x); OpenVINO fp32 14.0 s (1.11x); PyTorch bf16 5.96 s (2.61x); OpenVINO
int8 4.52 s (3.44x; features within 3.6e-2 relative) - the runtimes' ratios differ from machine to machine, bf16's
and int8's gains hold.

``auto`` is PyTorch fp32 (:func:`.network.resolve_precision`). OpenVINO fp32 gives the same detections as PyTorch
fp32 (scores within 1e-4, Dice 1.0 on the 7 scans of ``benchmarks/precision_check.py``) but is an optional package
with a per-predictor export and only 1.11x on the later machine, so it stays an option (``--runtime openvino``, the
``cpu-fast`` extra).

``--precision int8`` runs the backbone quantised by NNCF in OpenVINO (:mod:`.quantize`: calibrated on phantoms once
per weights, cached on disk); ``auto`` picks OpenVINO for it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from nodulenet.errors import NoduleNetError

RUNTIMES = ("auto", "torch", "onnx", "openvino")
_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}
# The exporters trace the backbone once on an input of this size (any multiple of 16 works; small is quick).
_TRACE_SHAPE_ZYX = (32, 32, 32)

Backbone = Callable[[Any], Any]  # padded input tensor [1, C, Z, Y, X] -> BackboneFeatures (float32)


def resolve_runtime(runtime: str, device: str, precision: str) -> str:
    """``torch``, ``onnx`` or ``openvino``; ``auto`` is ``torch`` (no export cost, see the module doc), except
    for ``int8``, which only OpenVINO runs.

    ONNX Runtime and OpenVINO run fp32 (OpenVINO also int8) on the CPU only here; a missing package is named with
    its install line.
    """
    if runtime not in RUNTIMES:
        raise NoduleNetError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision == "int8":  # only OpenVINO runs the quantised backbone (infer/quantize.py)
        if runtime not in ("auto", "openvino"):
            raise NoduleNetError(f"--precision int8 runs in OpenVINO: give --runtime openvino or auto, not {runtime}")
        from nodulenet.infer.quantize import check_int8_available

        check_int8_available(device)
        return "openvino"
    if runtime in ("auto", "torch"):
        return "torch"
    if device.startswith("cuda"):
        raise NoduleNetError(f"--runtime {runtime} runs on the CPU: use --runtime torch with --device {device}")
    if precision != "fp32":
        raise NoduleNetError(f"--runtime {runtime} runs fp32{' or int8' if runtime == 'openvino' else ''}: give "
                             "--precision fp32 (or use --runtime torch for bf16)")
    try:
        __import__(_PACKAGES[runtime])
    except ImportError:
        raise NoduleNetError(f"--runtime {runtime} needs the {_PACKAGES[runtime]} package: "
                             "pip install 'nodulenet[cpu-fast]'") from None
    return runtime


def _tuple_module(feature_net: Any) -> Any:
    """The backbone with a plain tuple output (the exporters do not take a NamedTuple)."""
    import torch

    class FeatureTuple(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = feature_net

        def forward(self, x: Any) -> tuple[Any, ...]:
            return tuple(self.net(x))

    return FeatureTuple().eval()


def _to_features(arrays: list[Any]) -> Any:
    import numpy as np
    import torch

    from nodulenet.model.backbone import BackboneFeatures

    return BackboneFeatures(*(torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in arrays))


def _onnx_backbone(model: Any, threads: int) -> Backbone:
    import warnings

    import onnxruntime as ort
    import torch

    module = _tuple_module(model.feature_net)
    example = torch.zeros((1, model.config.in_channels, *_TRACE_SHAPE_ZYX))
    names = ["out1", "out2", "out4", "comb3", "comb2"]
    spatial = {2: "z", 3: "y", 4: "x"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the size check, constant in the exported graph
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=names,
                          dynamic_axes={"x": spatial, **{n: spatial for n in names}}, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(x: Any) -> Any:
        return _to_features(session.run(names, {"x": x.contiguous().numpy()}))

    return run


def openvino_model(model: Any) -> Any:
    """The backbone converted to an OpenVINO model (fp32, dynamic spatial sizes) by its PyTorch front end."""
    import warnings

    import openvino as ov
    import torch

    module = _tuple_module(model.feature_net)
    example = torch.zeros((1, model.config.in_channels, *_TRACE_SHAPE_ZYX))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return ov.convert_model(module, example_input=example,
                                input=[ov.PartialShape([1, model.config.in_channels, -1, -1, -1])])


def _openvino_runner(ov_model: Any, threads: int) -> Backbone:
    import openvino as ov

    # f32 hint: OpenVINO would otherwise run fp32 layers in bf16 on AVX512-BF16 CPUs (the int8 model's
    # quantised convolutions run int8 either way; what stays float stays fp32, as in --precision fp32).
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY",
                                                         "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(x: Any) -> Any:
        result = request.infer({0: x.contiguous().numpy()})
        return _to_features([result[out] for out in compiled.outputs])

    return run


def torch_bf16_backbone(model: Any, device_type: str) -> Backbone:
    """The model's own backbone under bf16 autocast, features handed on as float32 (the heads stay fp32)."""
    import torch

    def run(x: Any) -> Any:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            features = model.feature_net(x)
        return type(features)(*(f.float() for f in features))

    return run


def make_backbone(model: Any, runtime: str, precision: str, device: str = "cpu",
                  prepare_config: Any = None) -> Backbone | None:
    """The backbone callable for :meth:`NoduleNet.predict`; None: the model's own fp32 ``feature_net``.

    ``prepare_config``: how the model's scans are prepared, for int8's calibration phantoms (default settings
    when None)."""
    import torch

    if runtime == "onnx":
        return _onnx_backbone(model, torch.get_num_threads())
    if precision == "int8":  # resolve_runtime made the runtime openvino
        from nodulenet.infer.quantize import int8_openvino_model

        return _openvino_runner(int8_openvino_model(model, prepare_config, openvino_model)[0],
                                torch.get_num_threads())
    if runtime == "openvino":
        return _openvino_runner(openvino_model(model), torch.get_num_threads())
    if precision == "bf16":
        return torch_bf16_backbone(model, "cuda" if device.startswith("cuda") else "cpu")
    return None
