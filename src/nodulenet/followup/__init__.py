"""Follow-up reading: compare a prior and a current chest CT of one patient, nodule by nodule.

Stages (each a plain function; :mod:`nodulenet.commands.compare` wraps them as ``nodulenet compare``):

- :mod:`nodulenet.export.nodule_type`: solid / part-solid / ground-glass from the HU inside a nodule's mask, the solid
  component's size, and the Lung-RADS mean diameter (long + short axis / 2);
- :mod:`.registration`: SimpleITK rigid then affine registration of the prior onto the current scan,
  initialised and masked by the lung masks;
- :mod:`.matching`: prior nodules mapped into the current scan, Hungarian assignment with a size-aware gate;
- :mod:`.growth`: volume and diameter change, volume doubling time, Lung-RADS growth;
- :mod:`.lung_rads`: Lung-RADS v2022 category per nodule and per exam, with the rule that decided it;
- :mod:`.compare_api`: the whole comparison, ``comparison.json`` and ``comparison.html``.

Lung-RADS here is a decision aid computed from automatic measurements, not a diagnosis: a radiologist confirms
every nodule, its type and its size before a category is used.
"""
