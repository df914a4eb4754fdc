"""The NoduleNet network (pure torch; never reads files).

Boxes are ``(z0, y0, x0, z1, y1, x1)`` voxels of the network input, end exclusive; arrays ``(z, y, x)``.
Public entry points: :class:`NoduleNet` + :class:`NoduleNetConfig`, :class:`NoduleTargets` (ground truth),
:class:`Detections` (output), and the checkpoint helpers.
"""

from .checkpoint import (
    CheckpointMismatchError,
    ImportReport,
    LoadedCheckpoint,
    import_published_state_dict,
    model_from_checkpoint_dict,
    to_checkpoint_dict,
)
from .config import NoduleNetConfig, published_config, tiny_config
from .nodulenet import Detections, EvalOutput, NoduleNet, NoduleTargets, count_parameters, cpu_has_fast_bf16

__all__ = [
    "CheckpointMismatchError",
    "Detections",
    "EvalOutput",
    "ImportReport",
    "LoadedCheckpoint",
    "NoduleNet",
    "NoduleNetConfig",
    "NoduleTargets",
    "count_parameters",
    "cpu_has_fast_bf16",
    "import_published_state_dict",
    "model_from_checkpoint_dict",
    "published_config",
    "tiny_config",
    "to_checkpoint_dict",
]
