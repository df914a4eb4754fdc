"""Cross-validation splits: by patient, seeded, validation never holds test cases, files round-trip."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from nodulenet.data.splits import assign_patient_groups, make_splits, read_split, write_splits
from nodulenet.errors import InputError


def lidc_like_cases() -> dict[str, str]:
    """20 patients; patient 3 has 3 series, patient 7 has a real scan + 2 synthetic variants."""
    cases = {f"LIDC-IDRI-{p:04d}": f"LIDC-IDRI-{p:04d}" for p in range(1, 21)}
    cases.update({"LIDC-IDRI-0003_aaaa1111": "LIDC-IDRI-0003", "LIDC-IDRI-0003_bbbb2222": "LIDC-IDRI-0003"})
    cases.update({"LIDC-IDRI-0007_synthetic1": "LIDC-IDRI-0007", "LIDC-IDRI-0007_synthetic2": "LIDC-IDRI-0007"})
    return cases


def test_folds_partition_by_patient_and_keep_test_out_of_validation() -> None:
    cases = lidc_like_cases()
    splits = make_splits(cases, k=6, seed=0)
    assert len(splits) == 6
    tests = [set(s.test) for s in splits]
    assert set().union(*tests) == set(cases) and sum(len(t) for t in tests) == len(cases)  # test folds partition
    for i, s in enumerate(splits):
        parts = [set(s.train), set(s.val), set(s.test)]
        for a, b in combinations(parts, 2):
            assert not a & b
        assert set().union(*parts) == set(cases)
        assert set(s.val) == tests[(i + 1) % 6]  # validation fold i = test fold i + 1
        for part in parts:  # every case of a patient in the same part
            patients = {cases[c] for c in part}
            assert {c for c in cases if cases[c] in patients} == part
    sizes = sorted(len(t) for t in tests)
    assert sizes[-1] - sizes[0] <= 3  # balanced up to the largest patient (3 cases)


def test_seeded() -> None:
    cases = lidc_like_cases()
    assert make_splits(cases, 5, seed=1) == make_splits(cases, 5, seed=1)
    assert assign_patient_groups(cases, 5, 1) != assign_patient_groups(cases, 5, 2)


def test_too_few_patients() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        make_splits({"a": "p1", "b": "p1", "c": "p2"}, k=3)


def test_two_folds_have_no_validation() -> None:
    splits = make_splits({f"c{i}": f"p{i}" for i in range(6)}, k=2)
    assert all(s.val == () for s in splits) and set(splits[0].train) == set(splits[1].test)


def test_files_round_trip_and_overlap_is_refused(tmp_path: Path) -> None:
    cases = lidc_like_cases()
    splits = make_splits(cases, k=4, seed=3)
    paths = write_splits(splits, cases, tmp_path)
    assert [p.name for p in paths] == [f"fold_{i}.json" for i in range(4)]
    assert read_split(paths[2]) == splits[2]
    summary = json.loads((tmp_path / "splits.json").read_text())
    assert summary["k"] == 4 and summary["n_patients"] == 20 and summary["n_cases"] == len(cases)
    d = json.loads(paths[0].read_text())
    d["val"].append(d["test"][0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match="both val and test"):
        read_split(bad)
