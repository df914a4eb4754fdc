"""Whole-scan inference: the network input, the network over the scan (tiles under a memory budget), and the
mapping of detections back to the original scan's voxels and world coordinates.

Conventions (DESIGN.md): arrays ``(z, y, x)``; world ``(x, y, z)`` DICOM LPS mm; boxes ``(z0, y0, x0, z1, y1, x1)``
voxels, end exclusive. ``infer`` imports ``io``, ``preprocess`` and ``model``, never ``export``; the full
``predict`` pipeline (with measurements and files) is :mod:`nodulenet.predict_api`. Importing this package is
cheap: modules (and torch) load when a name is first used.
"""

from __future__ import annotations

from nodulenet.lazy import lazy_getattr

_LAZY = {
    "load_model": "nodulenet.infer.weights",
    "LoadedModel": "nodulenet.infer.weights",
    "NoShippedModelError": "nodulenet.infer.weights",
    "shipped_weights_path": "nodulenet.infer.weights",
    "prepare_input": "nodulenet.infer.prepare_input",
    "PreparedInput": "nodulenet.infer.prepare_input",
    "run_network": "nodulenet.infer.network",
    "NetworkOutput": "nodulenet.infer.network",
    "plan_tiles": "nodulenet.infer.tiling",
    "estimate_bytes": "nodulenet.infer.tiling",
    "map_detection": "nodulenet.infer.mapping",
    "mask_to_original": "nodulenet.infer.mapping",
    "MappedDetection": "nodulenet.infer.mapping",
    "cohort_items": "nodulenet.infer.cohort",
    "expand_scan_arguments": "nodulenet.infer.cohort",
    "shard_from_environment": "nodulenet.infer.cohort",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
