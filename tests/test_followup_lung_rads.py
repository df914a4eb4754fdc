"""Lung-RADS v2022 categories: one case per published rule, expected category written from the criteria."""

from __future__ import annotations

import pytest

from nodulenet.followup.lung_rads import (LungRadsAssessment, LungRadsInput, exam_category, lung_rads_growth,
                                          nodule_category)

S, P, G = "solid", "part_solid", "ground_glass"


def persistent(kind, now, before, days, growing=False, solid=None, prior_solid=None):
    return LungRadsInput(kind, now, "persistent", solid, growing, before, prior_solid, days)


CASES = [
    # solid, baseline
    (LungRadsInput(S, 5.9), "2"), (LungRadsInput(S, 6.0), "3"), (LungRadsInput(S, 7.9), "3"),
    (LungRadsInput(S, 8.0), "4A"), (LungRadsInput(S, 14.9), "4A"), (LungRadsInput(S, 15.0), "4B"),
    # solid, new
    (LungRadsInput(S, 3.9, "new"), "2"), (LungRadsInput(S, 4.0, "new"), "3"), (LungRadsInput(S, 5.9, "new"), "3"),
    (LungRadsInput(S, 6.0, "new"), "4A"), (LungRadsInput(S, 7.9, "new"), "4A"), (LungRadsInput(S, 8.0, "new"), "4B"),
    # solid, growing
    (persistent(S, 7.5, 5.0, 365, growing=True), "4A"), (persistent(S, 8.0, 6.0, 365, growing=True), "4B"),
    # part-solid, baseline
    (LungRadsInput(P, 5.9, solid_component_mm=3.0), "2"), (LungRadsInput(P, 6.0, solid_component_mm=5.9), "3"),
    (LungRadsInput(P, 12.0, solid_component_mm=6.0), "4A"), (LungRadsInput(P, 12.0, solid_component_mm=7.9), "4A"),
    (LungRadsInput(P, 12.0, solid_component_mm=8.0), "4B"),
    # part-solid, new
    (LungRadsInput(P, 5.9, "new", solid_component_mm=3.0), "3"),
    (LungRadsInput(P, 10.0, "new", solid_component_mm=3.9), "4A"),
    (LungRadsInput(P, 10.0, "new", solid_component_mm=4.0), "4B"),
    # part-solid, growing solid component
    (persistent(P, 10.0, 9.0, 180, growing=True, solid=3.5, prior_solid=1.5), "4A"),
    (persistent(P, 10.0, 9.0, 180, growing=True, solid=4.0, prior_solid=2.0), "4B"),
    # non-solid
    (LungRadsInput(G, 29.9), "2"), (LungRadsInput(G, 29.9, "new"), "2"), (LungRadsInput(G, 30.0), "3"),
    (LungRadsInput(G, 30.0, "new"), "3"), (persistent(G, 20.0, 17.0, 365, growing=True), "2"),
    (persistent(G, 32.0, 31.5, 365), "2"),
    (persistent(G, 31.0, 29.5, 365), "3"),  # enlarged across 30 mm without meeting growth
    # stepped management (v2022)
    (persistent(S, 7.0, 7.0, 180), "2"),  # category 3 stable at 6 months
    (persistent(S, 7.0, 7.0, 60), "3"),  # too early to step down
    (persistent(S, 10.0, 10.0, 90), "3"),  # 4A stable at 3 months
    (persistent(S, 10.0, 10.0, 30), "4A"),
    (persistent(S, 16.0, 16.0, 90), "4B"),  # 4B has no step down
    (persistent(S, 4.0, 4.0, 365), "2"),
    (persistent(S, 6.3, 5.5, 365), "3"),  # crossed 6 mm: size threshold reached, not growth
]


@pytest.mark.parametrize(("nodule", "expected"), CASES)
def test_each_published_rule(nodule: LungRadsInput, expected: str) -> None:
    got = nodule_category(nodule)
    assert got.category == expected, (nodule, got)
    assert got.rule  # the rule that decided it is always said


def test_growth_is_more_than_1_5_mm_within_12_months() -> None:
    assert lung_rads_growth(6.0, 7.6, 365) and not lung_rads_growth(6.0, 7.5, 365)
    assert lung_rads_growth(6.0, 7.6, 90)
    assert not lung_rads_growth(6.0, 8.0, 730)  # 2 mm in 2 years is 1 mm per 12 months
    assert lung_rads_growth(6.0, 10.0, 730)


def test_exam_takes_the_most_suspicious_nodule() -> None:
    assert exam_category([]) == LungRadsAssessment("1", "no lung nodules")
    picked = exam_category([nodule_category(LungRadsInput(S, 5.0)), nodule_category(LungRadsInput(S, 9.0)),
                            nodule_category(LungRadsInput(G, 12.0))])
    assert picked.category == "4A" and "solid 8 to < 15 mm" in picked.rule


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown nodule type"):
        nodule_category(LungRadsInput("calcified", 5.0))
    with pytest.raises(ValueError, match="encounter"):
        nodule_category(LungRadsInput(S, 5.0, "later"))
