"""Pair the prior scan's nodules with the current scan's: Hungarian assignment on distance, size-aware gate.

The prior's centres are first mapped into the current scan (:meth:`Registration.prior_to_current`). The cost of
a pair is the distance between the mapped prior centre and the current centre (mm); a pair is allowed only
within the gate ``max(GATE_MIN_MM, GATE_SIZE_FACTOR * (d_prior + d_current) / 2 + GATE_SLACK_MM)`` (a big
nodule's centre moves more as it grows unevenly; registration leaves a few mm). Among allowed pairs the
assignment minimises the total distance (``scipy.optimize.linear_sum_assignment``), so two nearby nodules are
not both given to one. Unpaired prior nodules are ``resolved``, unpaired current ones ``new``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

GATE_MIN_MM = 8.0
GATE_SIZE_FACTOR = 0.75
GATE_SLACK_MM = 4.0


@dataclass(frozen=True)
class NodulePair:
    prior: int | None  # index into the prior's nodules (None: new)
    current: int | None  # index into the current's nodules (None: resolved)
    distance_mm: float | None


def gate_mm(prior_diameter_mm: float, current_diameter_mm: float) -> float:
    return max(GATE_MIN_MM, GATE_SIZE_FACTOR * 0.5 * (prior_diameter_mm + current_diameter_mm) + GATE_SLACK_MM)


def match_nodules(prior_xyz_mm: np.ndarray, prior_diameters_mm: Sequence[float], current_xyz_mm: np.ndarray,
                  current_diameters_mm: Sequence[float]) -> list[NodulePair]:
    """Pairs (persistent), then the unpaired current (new) and prior (resolved) nodules, each group in index order."""
    prior_xyz = np.asarray(prior_xyz_mm, dtype=np.float64).reshape(-1, 3)
    current_xyz = np.asarray(current_xyz_mm, dtype=np.float64).reshape(-1, 3)
    n_prior, n_current = len(prior_xyz), len(current_xyz)
    pairs: list[NodulePair] = []
    used_prior: set[int] = set()
    used_current: set[int] = set()
    if n_prior and n_current:
        distance = np.linalg.norm(prior_xyz[:, None, :] - current_xyz[None, :, :], axis=-1)
        gates = np.array([[gate_mm(dp, dc) for dc in current_diameters_mm] for dp in prior_diameters_mm])
        allowed = distance <= gates
        cost = np.where(allowed, distance, 1e6)  # a forbidden pair is never worth taking
        rows, cols = linear_sum_assignment(cost)
        for i, j in sorted(zip(rows.tolist(), cols.tolist())):
            if allowed[i, j]:
                pairs.append(NodulePair(i, j, float(distance[i, j])))
                used_prior.add(i)
                used_current.add(j)
    pairs += [NodulePair(None, j, None) for j in range(n_current) if j not in used_current]
    pairs += [NodulePair(i, None, None) for i in range(n_prior) if i not in used_prior]
    return pairs
