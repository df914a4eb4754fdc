"""Training cases with known nodules: phantoms, and real LIDC lungs with synthetic nodules inserted.

Both become ordinary prepared cases through :func:`nodulenet.preprocess.prepare.prepare_case`, so they go through
the same resampling, lung mask, normalisation and crop as real data, and training reads them like any other case
(decided over generating phantoms on the fly inside the loader: a phantom takes ~1 s to draw and ~1 s to prepare,
far slower than a crop, and a written case can be inspected, split and reused).

Conventions: world coordinates DICOM LPS mm ``(x, y, z)``; nodule ids in ``nodules.json`` = values of
``nodule_mask.nrrd``. Each case records ``source.patient_id``, so cross-validation keeps a phantom, or every
synthetic variant of one LIDC patient, in a single fold (:mod:`nodulenet.data.splits`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nodulenet.errors import InputError
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.volume import Volume
from nodulenet.preprocess.config import PrepareConfig
from nodulenet.preprocess.lidc_nodules import lidc_labels_for_series
from nodulenet.preprocess.lung_mask import segment_lungs
from nodulenet.preprocess.phantom import NODULE_KINDS, PhantomConfig, insert_nodules, make_phantom
from nodulenet.preprocess.prepare import CaseSummary, NoduleAnnotation, is_case_done, prepare_case

# A small chest (about 200 x 200 x 160 mm): cases of ~135 x 90 x 155 voxels after preparation, ~1.5 s each.
SMALL_PHANTOM = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=160.0,
                              slice_thickness_range_mm=(1.25, 2.5), n_nodules=3, diameter_range_mm=(5.0, 20.0))


def prepare_phantom_case(seed: int, out_dir: str | Path, phantom: PhantomConfig = SMALL_PHANTOM,
                         config: PrepareConfig | None = None, case_id: str | None = None) -> CaseSummary:
    """Draw the phantom of ``seed`` and prepare it as a case folder (its nodule outlines are the masks)."""
    config = config or PrepareConfig(overlay=False)
    ph = make_phantom(seed, phantom)
    case_id = case_id or Path(out_dir).name
    nodules = [NoduleAnnotation(n.id, tuple(n.center_world_xyz_mm), float(n.diameter_mm),  # type: ignore[arg-type]
                                extra={"kind": n.kind, "margin": n.margin, "synthetic": True})
               for n in ph.nodules]
    source = {"dataset": "phantom", "path": f"phantom seed {seed}", "patient_id": f"phantom-{seed}",
              "phantom_seed": int(seed), "phantom_config": phantom.to_dict(), "series_uid": ph.series_uid}
    return prepare_case(ph.image, out_dir, config, case_id=case_id, nodules=nodules, nodule_mask=ph.nodule_mask,
                        source=source)


def prepare_phantom_cases(out_root: str | Path, seeds: Sequence[int], phantom: PhantomConfig = SMALL_PHANTOM,
                          config: PrepareConfig | None = None, force: bool = False) -> list[CaseSummary]:
    """One case folder ``phantom-<seed>`` per seed under ``out_root``; finished cases are skipped (resumable)."""
    config = config or PrepareConfig(overlay=False)
    out = Path(out_root)
    summaries = []
    for seed in seeds:
        case_dir = out / f"phantom-{int(seed):05d}"
        if not force and is_case_done(case_dir, config):
            summaries.append(CaseSummary(case_dir.name, "skipped", str(case_dir)))
            continue
        summaries.append(prepare_phantom_case(int(seed), case_dir, phantom, config))
    return summaries


def _balls(shape: tuple[int, int, int], spacing_zyx: Sequence[float], centers_zyx: Sequence[np.ndarray],
           radii_mm: Sequence[float]) -> np.ndarray:
    """Boolean balls (mm radii on an anisotropic grid): keep-out zones around nodules that have no outline."""
    out = np.zeros(shape, dtype=bool)
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    for c, r in zip(centers_zyx, radii_mm):
        lo = np.maximum(np.floor(c - r / sp).astype(int), 0)
        hi = np.minimum(np.ceil(c + r / sp).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d2 = ((zz - c[0]) * sp[0]) ** 2 + ((yy - c[1]) * sp[1]) ** 2 + ((xx - c[2]) * sp[2]) ** 2
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= d2 <= r * r
    return out


def prepare_lidc_with_inserted_nodules(
    series_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    n_nodules: int = 4,
    *,
    config: PrepareConfig | None = None,
    kinds: Sequence[str] = NODULE_KINDS,
    diameter_range_mm: tuple[float, float] = (4.0, 25.0),
    case_id: str | None = None,
) -> CaseSummary:
    """A real LIDC-IDRI scan with ``n_nodules`` synthetic nodules inserted in its lungs, prepared as a case.

    The scan's real nodules (``config.min_readers`` or more readers) stay positives with their reader outlines;
    those marked by fewer readers stay ``excluded_nodules``. Inserted nodules keep 3 mm clear of both (plus 5 mm
    around an excluded nodule, whose outline is not in the mask). Inserted ids follow the real ones.
    """
    config = config or PrepareConfig(overlay=False)
    series_dir = Path(series_dir)
    ct = read_dicom_series(series_dir)
    labels = lidc_labels_for_series(series_dir, ct, min_readers=config.min_readers,
                                    consensus=config.consensus)  # type: ignore[arg-type]
    if labels is None:
        raise InputError(series_dir, "no LIDC annotation XML for this CT series")
    # The lung mask on the scan's own grid, with scanner padding turned into air exactly as prepare_case does.
    array = ct.array
    filled = np.where(array < config.padding_below_hu, np.asarray(config.padding_fill_hu, dtype=array.dtype), array)
    lungs = segment_lungs(ct.with_array(filled), config.lung).lungs > 0
    del filled
    real = labels.instance_mask.array
    keep_out = real > 0
    if labels.excluded_nodules:
        keep_out |= _balls(ct.shape_zyx, ct.spacing_zyx, [np.asarray(n.center_zyx) for n in labels.excluded_nodules],
                           [n.diameter_mm / 2.0 + 5.0 for n in labels.excluded_nodules])
    new_ct, inserted_mask, inserted = insert_nodules(ct, lungs, seed, n_nodules, kinds, diameter_range_mm,
                                                     exclusion_mask=keep_out)
    first_id = max([n.id for n in labels.nodules] + [n.id for n in labels.excluded_nodules] + [0])
    merged = real.astype(np.uint16)
    added = inserted_mask.array.astype(np.uint16)
    merged[(added > 0) & (merged == 0)] = added[(added > 0) & (merged == 0)] + np.uint16(first_id)

    def real_annotation(r: Any) -> NoduleAnnotation:
        return NoduleAnnotation(r.id, r.center_world_xyz_mm, r.diameter_mm, r.n_readers, dict(r.characteristics),
                                {"reader_ids": list(r.reader_ids), "synthetic": False})

    nodules = [real_annotation(r) for r in labels.nodules] + [
        NoduleAnnotation(first_id + n.id, tuple(n.center_world_xyz_mm), float(n.diameter_mm),  # type: ignore[arg-type]
                         extra={"kind": n.kind, "margin": n.margin, "synthetic": True}) for n in inserted]
    found = re.search(r"LIDC-IDRI-\d{4}", str(series_dir))
    patient = str(ct.meta.get("patient_id") or (found.group(0) if found else series_dir.name))
    case_id = case_id or f"{patient}_synthetic{int(seed)}"
    source = {"dataset": "LIDC-IDRI+synthetic", "path": str(series_dir), "xml": str(labels.xml_path),
              "patient_id": patient, "insert_seed": int(seed), "n_inserted": len(inserted),
              "inserted_kinds": [n.kind for n in inserted], "labels": labels.settings}
    return prepare_case(new_ct, out_dir, config, case_id=case_id, nodules=nodules,
                        nodule_mask=Volume.from_geometry(merged, ct.geometry),
                        excluded_nodules=[real_annotation(r) for r in labels.excluded_nodules], source=source)
