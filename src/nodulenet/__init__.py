"""NoduleNet: find, confirm and outline lung nodules in chest CT.

Research software, not a medical device. See ``DESIGN.md`` conventions: arrays are ``(z, y, x)``,
world coordinates are DICOM patient coordinates (LPS) in millimetres ordered ``(x, y, z)``.
"""

__version__ = "0.1.0"
