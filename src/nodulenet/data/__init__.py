"""Training data: prepared cases (checked, indexed, memory-mapped), crop sampling, augmentation, splits,
synthetic cases (phantoms, LIDC scans with inserted nodules), and the torch dataset/loader.

Conventions: arrays ``(z, y, x)`` on the prepared 1 mm grid; boxes ``(z0, y0, x0, z1, y1, x1)`` voxels, upper bounds
exclusive; world coordinates DICOM LPS mm ``(x, y, z)``; network images ``(raw - 128) / 128``.
"""
