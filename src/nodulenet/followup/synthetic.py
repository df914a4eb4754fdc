"""A prior and a current synthetic chest CT of one "patient", with known change: for tests, demos, benchmarks.

One seeded phantom chest (:func:`nodulenet.preprocess.phantom.make_phantom`, no nodules of its own) is scanned
twice. Four solid nodules are painted in with the generator's own shape model and renderer
(:func:`~nodulenet.preprocess.phantom_nodules.sample_shape`, :func:`~nodulenet.preprocess.phantom_nodules.render_shape`):

- ``grown``: on both scans, its diameter ``grow_mm[0]`` on the prior and ``grow_mm[1]`` on the current;
- ``stable``: the same nodule on both;
- ``resolved``: on the prior only;
- ``new``: on the current only.

The current scan is then resampled through a known rigid transform (the patient lying a little rotated and
shifted on the table), and each scan gets its own scanner noise. :class:`FollowupTruth` records where every
nodule is in each scan's world coordinates (LPS mm), its true volume (partial-volume sum) and the transform.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nodulenet.io.volume import Volume
from nodulenet.preprocess.phantom import PhantomConfig, make_phantom
from nodulenet.preprocess.phantom_nodules import correlated_noise, render_shape, sample_shape
from nodulenet.preprocess.resample import volume_to_sitk

ROLES = ("grown", "stable", "resolved", "new")


@dataclass
class FollowupTruth:
    """Ground truth of a follow-up pair (world coordinates of each scan, LPS mm; volumes in mm^3)."""

    seed: int
    interval_days: float
    rotation_deg_about_z: float
    translation_xyz_mm: tuple[float, float, float]
    rotation_centre_xyz_mm: tuple[float, float, float]
    prior: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {center_world_xyz_mm, volume_mm3, ...}
    current: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def current_from_prior(self, point_xyz_mm: Any) -> np.ndarray:
        """Where a point of the prior scan's patient is in the current scan's world (the inverse of the move)."""
        return np.asarray(self._move().GetInverse().TransformPoint(tuple(float(v) for v in point_xyz_mm)))

    def _move(self) -> Any:
        import SimpleITK as sitk

        move = sitk.Euler3DTransform()
        move.SetCenter(self.rotation_centre_xyz_mm)
        move.SetRotation(0.0, 0.0, math.radians(self.rotation_deg_about_z))
        move.SetTranslation(self.translation_xyz_mm)
        return move


def _lung_sites(lung: np.ndarray, spacing: np.ndarray, rng: np.random.Generator, n: int, clearance_mm: float,
                apart_mm: float) -> list[np.ndarray]:
    """``n`` index-mm points at least ``clearance_mm`` inside the lungs and ``apart_mm`` from each other."""
    depth = ndimage.distance_transform_edt(lung, sampling=spacing)
    candidates = np.argwhere(depth >= clearance_mm) * spacing
    if len(candidates) == 0:
        raise ValueError("the phantom's lungs are too small for the follow-up nodules")
    picked: list[np.ndarray] = []
    for index in rng.permutation(len(candidates)):
        point = candidates[index]
        if all(np.linalg.norm(point - p) >= apart_mm for p in picked):
            # Off the voxel grid, as real nodules are (a centre on a voxel also makes the renderer divide by 0).
            picked.append(point + rng.uniform(-0.5, 0.5, 3) * spacing)
            if len(picked) == n:
                return picked
    raise ValueError(f"found room for {len(picked)} of {n} follow-up nodules")


def _paint(hu: np.ndarray, labels: np.ndarray, lung: np.ndarray, spacing: np.ndarray, shape: Any,
           label: int, rng: np.random.Generator) -> float:
    """Blend one rendered nodule into ``hu`` (float32, in place), label its core, return its volume (mm^3).

    The blend is the generator's (occupancy x the nodule's own HU over the background, inside the lungs); the
    scanner noise is added to the whole scan afterwards, so none is put back here.
    """
    reach = shape.reach_mm
    lo = np.clip(np.floor((shape.center_mm - reach) / spacing).astype(int) - 2, 0, hu.shape)
    hi = np.clip(np.ceil((shape.center_mm + reach) / spacing).astype(int) + 3, 0, hu.shape)
    n_sub = max(1, int(np.ceil(spacing[0] / (0.75 * (spacing[1] + spacing[2])))))
    outer, _ = render_shape(shape, lo, hi, spacing, n_sub)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    inside = outer * lung[box]
    region = hu[box]
    region += (inside * np.maximum(shape.outer_hu - region, 0.0)).astype(np.float32)
    labels[box][inside >= 0.5] = label
    return float(inside.sum()) * float(np.prod(spacing))


def make_followup_pair(seed: int, *, interval_days: float = 180.0, grow_mm: tuple[float, float] = (6.0, 9.0),
                       stable_mm: float = 8.0, resolved_mm: float = 7.0, new_mm: float = 6.0,
                       rotation_deg: float = 4.0, translation_xyz_mm: tuple[float, float, float] = (7.0, -5.0, 6.0),
                       config: PhantomConfig | None = None) -> tuple[Volume, Volume, Volume, Volume, FollowupTruth]:
    """``(prior, current, prior_labels, current_labels, truth)`` (module doc). Pure: same seed, same pair."""
    import SimpleITK as sitk

    base = make_phantom(seed, replace(config or PhantomConfig(), n_nodules=0, noise_sigma_hu=0.0))
    cfg = base.config
    spacing = np.asarray(base.image.spacing_zyx, dtype=np.float64)
    lung = base.lung_mask.array.astype(bool)
    rng_sites, rng_shapes, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, 7]).spawn(3))
    sizes = {"grown": max(grow_mm), "stable": stable_mm, "resolved": resolved_mm, "new": new_mm}
    sites = dict(zip(ROLES, _lung_sites(lung, spacing, rng_sites, len(ROLES), 0.5 * max(sizes.values()) + 6.0,
                                        35.0)))
    shapes = {role: sample_shape(rng_shapes, "solid", 1.0) for role in ROLES}  # unit size, scaled per scan
    truth = FollowupTruth(seed, float(interval_days), float(rotation_deg), tuple(float(v) for v in translation_xyz_mm),
                          tuple(float(v) for v in base.image.geometry.voxel_to_world(
                              (np.asarray(base.image.shape_zyx) - 1) / 2.0)))
    scans: list[tuple[Volume, Volume]] = []
    for when, roles in (("prior", ("grown", "stable", "resolved")), ("current", ("grown", "stable", "new"))):
        hu = base.image.array.astype(np.float32)
        labels = np.zeros(hu.shape, dtype=np.uint8)
        for label, role in enumerate(roles, start=1):
            diameter = grow_mm[0 if when == "prior" else 1] if role == "grown" else sizes[role]
            shape = replace(shapes[role], radius_mm=0.5 * diameter, center_mm=sites[role])
            volume = _paint(hu, labels, lung, spacing, shape, label, rng_shapes)
            centre = ndimage.center_of_mass(labels == label)
            getattr(truth, when)[role] = {
                "label": label, "diameter_mm": float(diameter), "volume_mm3": volume,
                "center_world_xyz_mm": [float(v) for v in base.image.geometry.voxel_to_world(centre)]}
        scans.append((base.image.with_array(hu), Volume.from_geometry(labels, base.image.geometry, {})))
    prior, prior_labels = scans[0]
    current, current_labels = scans[1]
    # The patient moved: the current scan shows the prior's patient through the rigid move.
    move = truth._move()
    moved = []
    for volume, interpolator, fill in ((current, sitk.sitkLinear, -1000.0), (current_labels, sitk.sitkNearestNeighbor, 0)):
        image = volume_to_sitk(volume)
        out = sitk.Resample(image, image, move, interpolator, fill, image.GetPixelID())
        moved.append(volume.with_array(sitk.GetArrayFromImage(out)))
    current, current_labels = moved
    for role, record in truth.current.items():
        record["center_world_xyz_mm"] = [float(v) for v in truth.current_from_prior(record["center_world_xyz_mm"])]
    noisy = []
    for volume in (prior, current):
        hu = volume.array.astype(np.float32)
        hu += np.float32(20.0) * correlated_noise(rng_noise, hu.shape, cfg.noise_correlation_px)
        noisy.append(volume.with_array(np.rint(np.clip(hu, -1024, 3071)).astype(np.int16)))
    return noisy[0], noisy[1], prior_labels, current_labels, truth


PRIOR_STUDY_DATE = "20250101"  # the DICOM pair's StudyDates: the current one is interval_days later


def write_followup_pair(out_dir: str | Path, seed: int, *, fmt: str = "nii.gz", patient_id: str = "FOLLOWUP-PHANTOM",
                        **kwargs: Any) -> dict[str, Path]:
    """Write the pair into ``out_dir``: ``prior.<fmt>``, ``current.<fmt>``, their label maps (always ``.nii.gz``)
    and ``truth.json``.

    ``fmt="dicom"`` writes ``prior/`` and ``current/`` as DICOM CT series
    (:func:`~nodulenet.io.dicom_write.write_ct_series`) of one patient (``patient_id``) in two studies (own Study/Series/Frame of Reference UIDs, derived from the seed),
    with StudyDates :data:`PRIOR_STUDY_DATE` and ``interval_days`` (whole days) later, as a follow-up exam has.
    """
    from datetime import date, timedelta

    from nodulenet.io.atomic import write_json_atomic
    from nodulenet.io.image_files import write_image

    out = Path(out_dir)
    prior, current, prior_labels, current_labels, truth = make_followup_pair(seed, **kwargs)
    labels = {"prior_labels": out / "prior_labels.nii.gz", "current_labels": out / "current_labels.nii.gz"}
    for key, volume in zip(labels, (prior_labels, current_labels)):
        write_image(volume, labels[key])
    if fmt == "dicom":
        from pydicom.uid import generate_uid

        from nodulenet.io.dicom_write import SeriesIdentity, write_ct_series

        first = date(int(PRIOR_STUDY_DATE[:4]), int(PRIOR_STUDY_DATE[4:6]), int(PRIOR_STUDY_DATE[6:]))
        scans = {}
        for name, volume, when in (("prior", prior, first), ("current", current,
                                                               first + timedelta(days=round(truth.interval_days)))):
            key = [f"nodulenet-followup-{seed}-{patient_id}", name]
            identity = SeriesIdentity(
                study_uid=generate_uid(entropy_srcs=[*key, "study"]),
                series_uid=generate_uid(entropy_srcs=[*key, "series"]),
                frame_of_reference_uid=generate_uid(entropy_srcs=[*key, "frame of reference"]), patient_id=patient_id,
                patient_name="Followup^Phantom", study_description=f"NoduleNet follow-up phantom ({name})",
                series_description=f"Synthetic chest CT, follow-up seed {seed}, {name} (not a patient)",
                date=when.strftime("%Y%m%d"))
            write_ct_series(volume, out / name, identity)
            scans[name] = out / name
    else:
        scans = {"prior": out / f"prior.{fmt}", "current": out / f"current.{fmt}"}
        for name, volume in (("prior", prior), ("current", current)):
            write_image(volume, scans[name])
    paths = {**scans, **labels}
    paths["truth"] = write_json_atomic(out / "truth.json", truth.to_dict())
    return paths
