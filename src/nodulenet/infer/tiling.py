"""How much memory the network needs for an input, and how to cut a scan into tiles that fit a budget.

Conventions: shapes and indices ``(z, y, x)`` in voxels of the preprocessed (1 mm) grid; a tile is
``start..stop`` (stop exclusive) and owns its CORE ``core_start..core_stop``. Cores partition the scan; each
tile adds ``overlap`` voxels of context on every side where the scan continues. A detection is reported by the
tile whose core holds its centre, so every place in the scan is looked at by exactly one tile with at least
``overlap`` voxels of context around it (except at the scan's own border, as in a single pass).

The memory model is linear in the padded input size. Its slope comes from the network's channel counts: every
feature map is ``channels x voxels / stride^3`` values. During inference (no autograd) the peak holds the maps
kept for later (``out1``, ``out2``, ``comb2``, the decoder skips) plus the few tensors of the block being
computed, so ``bytes = voxels * element_size * (1 + sum over kept maps + working set)``; for the published
network that is 99 bytes per input voxel in fp32. Measured on the build machine (peak RSS growth of one pass,
fp32): 383 MiB at 128^3 and 712 MiB at 160x192x192 (a slope of 91 bytes/voxel plus ~200 MiB of fixed cost:
oneDNN scratch, anchors, RPN/RCNN/mask-head work), so the estimate is that slope x :data:`MEMORY_SAFETY` plus
:data:`FIXED_OVERHEAD_BYTES`, an upper bound at both sizes (459 and 930 MiB).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

# Multiplies the analytic slope (allocator slack, BatchNorm/ReLU temporaries); plus a fixed cost per pass.
MEMORY_SAFETY = 1.25
# 400 MiB, not the ~200 MiB of a quiet run: one pass on 64x160x160 grew RSS by 531 MiB in a CI run on a busy
# machine (288-334 MiB when quiet); a memory budget must hold for the worst case, not the typical one.
FIXED_OVERHEAD_BYTES = 400 * 2**20
# Context added on each side of a tile's core: larger than the largest anchor (50 mm) so a nodule near a
# core border is seen whole, and a multiple of the 16-voxel network stride.
DEFAULT_OVERLAP = 48
# Cores smaller than this waste most of a tile on overlap; refuse budgets that would need them.
MIN_CORE = 32


class MemoryBudgetError(ValueError):
    """The memory budget is too small for even the smallest tile of this network."""


@dataclass(frozen=True)
class Tile:
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    core_start: tuple[int, int, int]
    core_stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"start": list(self.start), "stop": list(self.stop), "core_start": list(self.core_start),
                "core_stop": list(self.core_stop)}


def padded_shape(shape_zyx: tuple[int, ...], multiple: int = 16) -> tuple[int, int, int]:
    return tuple(int(math.ceil(s / multiple) * multiple) for s in shape_zyx)  # type: ignore[return-value]


def bytes_per_input_voxel(net_config: Any, element_size: int = 4) -> float:
    """Estimated peak bytes of one inference pass per (padded) input voxel (see the module docstring)."""
    c_pre, c1, c2, c3, c4, c_back3, c_back2 = net_config.backbone_channels
    n_anchors = len(net_config.anchor_sizes)
    kept = (  # maps alive until the end of the pass, in values per input voxel
        c1 / 8  # out1 (stride 2), kept for the mask head
        + c2 / 64 + c_back2 / 64  # out2 (RCNN crops) and comb2 (RPN, mask head)
        + c3 / 512 + c4 / 4096 + c_back3 / 512  # out3, out4, comb3
        + n_anchors * 7 / 64  # RPN logits + 6 deltas per anchor at stride 4
    )
    # The largest working set: a residual block at stride 2 holds its input, two conv outputs and the shortcut.
    working = 4 * max(c_pre, c1) / 8
    return element_size * (1.0 + kept + working) * MEMORY_SAFETY


def estimate_bytes(net_config: Any, shape_zyx: tuple[int, ...], element_size: int = 4) -> float:
    """Estimated peak bytes of the network on an input of ``shape_zyx`` (padded internally to 16)."""
    n = math.prod(padded_shape(shape_zyx, int(net_config.max_stride)))
    return FIXED_OVERHEAD_BYTES + n * bytes_per_input_voxel(net_config, element_size)


def _axis_cores(length: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def tiles_for_parts(shape_zyx: tuple[int, int, int], parts_zyx: tuple[int, int, int],
                    overlap: int = DEFAULT_OVERLAP) -> list[Tile]:
    """Tiles from splitting each axis into ``parts_zyx`` cores, each grown by ``overlap`` inside the scan."""
    per_axis = [_axis_cores(n, p) for n, p in zip(shape_zyx, parts_zyx)]
    tiles = []
    for cores in itertools.product(*per_axis):
        start = tuple(max(0, a - overlap) for a, _ in cores)
        stop = tuple(min(n, b + overlap) for (_, b), n in zip(cores, shape_zyx))
        core_start, core_stop = tuple(a for a, _ in cores), tuple(b for _, b in cores)
        tiles.append(Tile(start, stop, core_start, core_stop))  # type: ignore[arg-type]
    return tiles


def plan_tiles(shape_zyx: tuple[int, int, int], net_config: Any, budget_bytes: float | None,
               element_size: int = 4, overlap: int = DEFAULT_OVERLAP) -> list[Tile]:
    """One tile (the whole scan) when it fits ``budget_bytes`` (or no budget), else the fewest tiles that fit.

    Among splits with the fewest tiles the one with the least total tile volume wins (the least overlap work).
    Raises :class:`MemoryBudgetError` when even cores of :data:`MIN_CORE` voxels would not fit.
    """
    whole = tiles_for_parts(shape_zyx, (1, 1, 1), overlap)
    if budget_bytes is None or estimate_bytes(net_config, shape_zyx, element_size) <= budget_bytes:
        return whole
    max_parts = [max(1, n // MIN_CORE) for n in shape_zyx]
    best: tuple[int, int, list[Tile]] | None = None
    for parts in itertools.product(*(range(1, m + 1) for m in max_parts)):
        count = math.prod(parts)
        if best is not None and count > best[0]:
            continue
        tiles = tiles_for_parts(shape_zyx, parts, overlap)  # type: ignore[arg-type]
        if max(estimate_bytes(net_config, t.shape, element_size) for t in tiles) > budget_bytes:
            continue
        work = sum(math.prod(padded_shape(t.shape)) for t in tiles)
        if best is None or (count, work) < (best[0], best[1]):
            best = (count, work, tiles)
    if best is None:
        smallest_shape = tuple(min(n, MIN_CORE + 2 * overlap) for n in shape_zyx)
        smallest = estimate_bytes(net_config, smallest_shape, element_size)
        raise MemoryBudgetError(f"a memory budget of {budget_bytes / 2**30:.2f} GiB is too small for this network: "
                                f"even the smallest tile needs about {smallest / 2**30:.2f} GiB")
    return best[2]


def _meminfo_bytes(key: str) -> float | None:
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith(key + ":"):
                return float(line.split()[1]) * 1024.0
    except OSError:
        return None
    return None


def current_rss_bytes() -> float:
    """Resident memory of this process now (Linux /proc; 0 where unknown)."""
    try:
        pages = int(open("/proc/self/statm", encoding="ascii").read().split()[1])
        import os

        return float(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0.0


def network_memory_budget(device: str, max_memory_gb: float | None) -> float | None:
    """Bytes the network may use on ``device`` now.

    CPU: with ``max_memory_gb`` (a limit for the whole process), the limit minus what the process already holds
    (scan, model); without it, 80% of the memory the system reports available. CUDA: the GPU's free memory
    (90%), capped by ``max_memory_gb``. None when nothing is known (then the scan runs in one pass).
    """
    limit = None if max_memory_gb is None else float(max_memory_gb) * 2**30
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        budget = 0.9 * float(free)
        return budget if limit is None else min(budget, limit)
    if limit is not None:
        return limit - current_rss_bytes()
    available = _meminfo_bytes("MemAvailable")
    return None if available is None else 0.8 * available
