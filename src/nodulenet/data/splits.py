"""Cross-validation splits by patient, seeded, written as JSON files.

Fold ``i`` of ``k``: test = patient group ``i``, validation = group ``(i + 1) % k``, training = the other ``k - 2``
groups. So validation (used to pick the best checkpoint) never holds a test case, and every case of one patient -
several series, or a real scan with synthetic nodules inserted - stays in one group (see
:func:`nodulenet.data.cases.patient_id_for`). With ``k = 2`` there is no room for both: validation is then empty.

Files written by :func:`write_splits` into ``out_dir``: ``fold_<i>.json`` per fold
(``{"fold", "k", "seed", "train", "val", "test", "patients"}``, case ids sorted) and ``splits.json`` (the groups,
the seed, and how each case was assigned to its patient).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.atomic import write_json_atomic

SPLIT_FORMAT = "nodulenet-split"


@dataclass(frozen=True)
class Split:
    """The case ids of one fold."""

    fold: int
    k: int
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self, patients: Mapping[str, str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"format": SPLIT_FORMAT, "fold": self.fold, "k": self.k, "seed": self.seed,
                             "train": list(self.train), "val": list(self.val), "test": list(self.test)}
        if patients is not None:
            d["patients"] = {c: patients[c] for c in (*self.train, *self.val, *self.test) if c in patients}
        return d


def assign_patient_groups(case_patients: Mapping[str, str], k: int, seed: int) -> list[list[str]]:
    """``k`` groups of case ids; a patient's cases stay together; groups balanced by number of cases.

    Patients are shuffled by ``seed``, then placed largest first into the group holding the fewest cases so far
    (ties broken by group number) - deterministic for a seed, and balanced when patients have several series.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case, patient in sorted(case_patients.items()):
        by_patient[patient].append(case)
    patients = sorted(by_patient)
    if len(patients) < k:
        raise ValueError(f"{len(patients)} patient(s) cannot fill {k} folds")
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    order.sort(key=lambda p: -len(by_patient[p]))  # stable: shuffled order kept among equal sizes
    groups: list[list[str]] = [[] for _ in range(k)]
    for patient in order:
        target = min(range(k), key=lambda g: (len(groups[g]), g))
        groups[target] += by_patient[patient]
    return [sorted(g) for g in groups]


def make_splits(case_patients: Mapping[str, str], k: int = 6, seed: int = 0) -> list[Split]:
    """All ``k`` folds (see the module doc). The published NoduleNet used 6-fold cross-validation."""
    groups = assign_patient_groups(case_patients, k, seed)
    splits = []
    for i in range(k):
        val_group = (i + 1) % k if k > 2 else None
        train = sorted(c for g in range(k) if g not in (i, val_group) for c in groups[g])
        val = tuple(groups[val_group]) if val_group is not None else ()
        splits.append(Split(i, k, seed, tuple(train), val, tuple(groups[i])))
    return splits


def write_splits(splits: Sequence[Split], case_patients: Mapping[str, str], out_dir: str | Path,
                 sources: Sequence[str] = ()) -> list[Path]:
    """Write ``fold_<i>.json`` for every split and ``splits.json`` (atomic); return the fold files."""
    out = Path(out_dir)
    paths = [write_json_atomic(out / f"fold_{s.fold}.json", s.to_dict(case_patients)) for s in splits]
    if splits:
        s0 = splits[0]
        write_json_atomic(out / "splits.json", {
            "format": SPLIT_FORMAT, "k": s0.k, "seed": s0.seed, "n_cases": len(case_patients),
            "n_patients": len(set(case_patients.values())), "sources": list(sources),
            "groups": [list(s.test) for s in splits], "patients": dict(sorted(case_patients.items())),
            "rule": "fold i: test = group i, val = group (i+1) % k, train = the rest; a patient's cases share a group",
        })
    return paths


def read_split(path: str | Path) -> Split:
    """Read one ``fold_<i>.json``; checks that no case is in two of train/val/test."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        split = Split(int(d["fold"]), int(d["k"]), int(d["seed"]), tuple(map(str, d["train"])),
                      tuple(map(str, d.get("val", []))), tuple(map(str, d.get("test", []))))
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a split file ({type(exc).__name__}: {exc})") from None
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = set(getattr(split, a)) & set(getattr(split, b))
        if both:
            raise InputError(path, f"{len(both)} case(s) in both {a} and {b}, e.g. {sorted(both)[0]}")
    return split
