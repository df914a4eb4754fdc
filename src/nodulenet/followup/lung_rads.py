"""Lung-RADS v2022 (ACR) category of each nodule and of the exam, with the rule that decided it.

A decision aid computed from automatic measurements, NOT a diagnosis: the categories need a radiologist who
confirms each nodule, its type and its size, and who judges what this module cannot see (calcification and fat,
which make a nodule category 1; perifissural and juxtapleural shape, which can make a solid nodule up to 10 mm
category 2; airway nodules; atypical cysts; findings that suggest infection, category 0; the 4X features).

Sizes are the Lung-RADS mean diameter, (long axis + short axis) / 2 rounded to one decimal, in mm; a part-solid
nodule's solid component is measured the same way. A nodule is one of three encounters:

- ``baseline``: the first screening exam (no prior to compare with);
- ``new``: absent on the prior exam;
- ``persistent``: seen on the prior too, with its ``prior_mean_diameter_mm`` (and solid component), the interval
  in days, and whether it is ``growing`` (:func:`lung_rads_growth`: mean diameter up by more than 1.5 mm within
  12 months; for a part-solid nodule, its solid component).

The rules, solid nodules (mm): baseline < 6 -> 2, 6 to < 8 -> 3, 8 to < 15 -> 4A, >= 15 -> 4B; new < 4 -> 2,
4 to < 6 -> 3, 6 to < 8 -> 4A, >= 8 -> 4B; growing < 8 -> 4A, >= 8 -> 4B. Part-solid: baseline total < 6 -> 2,
solid component < 6 -> 3, 6 to < 8 -> 4A, >= 8 -> 4B; new total < 6 -> 3; new or growing solid component < 4 ->
4A, >= 4 -> 4B. Non-solid (ground glass): < 30 -> 2 (baseline, new or growing); >= 30 baseline or new -> 3,
>= 30 unchanged or slowly growing -> 2. A persistent nodule that is not growing is classified by its current
size when that reaches a higher category than its prior size did ("size thresholds apply to nodules that
enlarge, reaching a higher size category"); otherwise v2022's stepped management applies: a category 3 nodule
stable at its 6-month follow-up becomes 2, a 4A stable at its 3-month follow-up becomes 3 (intervals shorter
than 5 and 2.5 months keep the prior category). The exam takes the highest category of its nodules, and 1 when
there are none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

CATEGORIES = ("1", "2", "3", "4A", "4B")  # lowest to highest suspicion (0 and 4X need a reader)
ENCOUNTERS = ("baseline", "new", "persistent")
GROWTH_MM = 1.5  # mean diameter increase that is growth ...
GROWTH_WINDOW_DAYS = 365.25  # ... within a 12-month interval
# Stepped management: the interval at which a stable category 3 / 4A nodule steps down (a little under the
# recommended 6- and 3-month follow-up, as scans are rarely exactly on the day).
STEP_DOWN_DAYS = {"3": 150.0, "4A": 75.0}
STEP_DOWN_TO = {"3": "2", "4A": "3"}
DECISION_AID = ("Lung-RADS v2022 category from automatic measurements: a decision aid for the reading "
                "radiologist, not a diagnosis")


@dataclass(frozen=True)
class LungRadsInput:
    """One nodule as Lung-RADS sees it (module doc)."""

    nodule_type: str  # "solid", "part_solid" or "ground_glass"
    mean_diameter_mm: float
    encounter: str = "baseline"
    solid_component_mm: float | None = None  # part-solid only
    growing: bool = False  # persistent only
    prior_mean_diameter_mm: float | None = None  # persistent only
    prior_solid_component_mm: float | None = None
    interval_days: float | None = None


@dataclass(frozen=True)
class LungRadsAssessment:
    category: str
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank(category: str) -> int:
    return CATEGORIES.index(category)


def lung_rads_growth(prior_mm: float, current_mm: float, interval_days: float) -> bool:
    """Lung-RADS growth: mean diameter up by more than 1.5 mm within 12 months.

    Over a longer interval the increase is scaled to 12 months (a nodule that grew 2 mm in 2 years grew 1 mm per
    12 months: not growth); over a shorter one it is taken as it is.
    """
    increase = current_mm - prior_mm
    if interval_days > GROWTH_WINDOW_DAYS:
        increase *= GROWTH_WINDOW_DAYS / interval_days
    return increase > GROWTH_MM + 1e-9


def _solid(d: float, encounter: str) -> LungRadsAssessment:
    if encounter == "new":
        for limit, cat in ((4.0, "2"), (6.0, "3"), (8.0, "4A")):
            if d < limit:
                low = {"2": "new solid < 4 mm", "3": "new solid 4 to < 6 mm", "4A": "new solid 6 to < 8 mm"}[cat]
                return LungRadsAssessment(cat, low)
        return LungRadsAssessment("4B", "new solid >= 8 mm")
    if encounter == "growing":
        return LungRadsAssessment("4A", "growing solid < 8 mm") if d < 8.0 else LungRadsAssessment(
            "4B", "growing solid >= 8 mm")
    for limit, cat, rule in ((6.0, "2", "solid < 6 mm"), (8.0, "3", "solid 6 to < 8 mm"),
                             (15.0, "4A", "solid 8 to < 15 mm")):
        if d < limit:
            return LungRadsAssessment(cat, rule)
    return LungRadsAssessment("4B", "solid >= 15 mm")


def _part_solid(d: float, s: float | None, encounter: str) -> LungRadsAssessment:
    solid = 0.0 if s is None else s
    if encounter == "new" and d < 6.0:
        return LungRadsAssessment("3", "new part-solid < 6 mm total")
    if encounter in ("new", "growing"):
        word = "new" if encounter == "new" else "growing"
        if solid < 4.0:
            return LungRadsAssessment("4A", f"part-solid with a {word} solid component < 4 mm")
        return LungRadsAssessment("4B", f"part-solid with a {word} solid component >= 4 mm")
    if d < 6.0:
        return LungRadsAssessment("2", "part-solid < 6 mm total")
    for limit, cat, rule in ((6.0, "3", "part-solid >= 6 mm, solid component < 6 mm"),
                             (8.0, "4A", "part-solid, solid component 6 to < 8 mm")):
        if solid < limit:
            return LungRadsAssessment(cat, rule)
    return LungRadsAssessment("4B", "part-solid, solid component >= 8 mm")


def _ground_glass(d: float, encounter: str) -> LungRadsAssessment:
    if d < 30.0:
        return LungRadsAssessment("2", "non-solid < 30 mm")
    if encounter in ("baseline", "new"):
        return LungRadsAssessment("3", f"non-solid >= 30 mm ({encounter})")
    if encounter == "growing":
        return LungRadsAssessment("3", "non-solid >= 30 mm and growing (only unchanged or slowly growing ones are 2)")
    return LungRadsAssessment("2", "non-solid >= 30 mm, unchanged")


def _by_size(kind: str, d: float, s: float | None, encounter: str) -> LungRadsAssessment:
    if kind == "solid":
        return _solid(d, encounter)
    if kind == "part_solid":
        return _part_solid(d, s, encounter)
    if kind == "ground_glass":
        return _ground_glass(d, encounter)
    raise ValueError(f"unknown nodule type {kind!r}; expected solid, part_solid or ground_glass")


def nodule_category(n: LungRadsInput) -> LungRadsAssessment:
    """The Lung-RADS v2022 category of one nodule and the rule that decided it (module doc)."""
    if n.encounter not in ENCOUNTERS:
        raise ValueError(f"encounter must be one of {ENCOUNTERS}, got {n.encounter!r}")
    if n.mean_diameter_mm < 0:
        raise ValueError(f"mean diameter must be >= 0, got {n.mean_diameter_mm}")
    d, s = round(float(n.mean_diameter_mm), 1), n.solid_component_mm
    if n.encounter in ("baseline", "new"):
        return _by_size(n.nodule_type, d, s, n.encounter)
    if n.growing:
        return _by_size(n.nodule_type, d, s, "growing")
    # Persistent and not growing: current size if it crossed into a higher category, else stepped management.
    now = _by_size(n.nodule_type, d, s, "baseline")
    if n.prior_mean_diameter_mm is None:
        return LungRadsAssessment(now.category, f"{now.rule}, persistent (prior size unknown)")
    before = _by_size(n.nodule_type, round(float(n.prior_mean_diameter_mm), 1), n.prior_solid_component_mm,
                      "baseline")
    if _rank(now.category) > _rank(before.category):
        return LungRadsAssessment(now.category, f"{now.rule}: enlarged into a higher size category")
    if n.nodule_type == "ground_glass":
        return _ground_glass(d, "stable")
    step_days = STEP_DOWN_DAYS.get(before.category)
    if step_days is not None and n.interval_days is not None and n.interval_days >= step_days:
        months = "6" if before.category == "3" else "3"
        return LungRadsAssessment(STEP_DOWN_TO[before.category],
                                  f"category {before.category} ({before.rule}) stable at {months}-month follow-up "
                                  f"(stepped management)")
    return LungRadsAssessment(before.category, f"{before.rule}, stable")


def exam_category(assessments: Sequence[LungRadsAssessment]) -> LungRadsAssessment:
    """The exam's category: its most suspicious nodule's (1 when it has no nodule)."""
    if not assessments:
        return LungRadsAssessment("1", "no lung nodules")
    worst = max(assessments, key=lambda a: _rank(a.category))
    return LungRadsAssessment(worst.category, f"most suspicious nodule: {worst.rule}")
