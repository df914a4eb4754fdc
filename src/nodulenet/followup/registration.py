"""Register the prior scan onto the current one (SimpleITK): rigid, then affine, masked by the lungs.

Both scans are resampled to :data:`REGISTRATION_SPACING_MM` isotropic voxels first (a chest needs no finer
grid to align to a millimetre, and it makes the two-stage registration take seconds), their HU clipped to
the lung window so the table and bone do not dominate, and the metric is evaluated only inside the lungs
(each scan's own lung mask, dilated by a few mm so the pleura and the vessels are in). The rigid stage starts
from the lung masks' centres of mass (``CenteredTransformInitializer`` with ``MOMENTS``), so a patient lying
centimetres off the last position is found; the affine stage starts from the rigid result and absorbs the
different breath-hold.

The returned transform maps a point of the CURRENT scan (the fixed image) to the PRIOR (the moving image), as
ITK's registration does; :meth:`Registration.prior_to_current` maps prior points (nodule centres) the other way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nodulenet.errors import NoduleNetError
from nodulenet.io.volume import Volume

logger = logging.getLogger(__name__)

REGISTRATION_SPACING_MM = 2.0
HU_WINDOW = (-1000.0, 200.0)
LUNG_MARGIN_MM = 6.0
MIN_LUNG_DICE = 0.6  # below this after registration the scans are not of the same chest region


class RegistrationError(NoduleNetError):
    """The two scans could not be aligned (no common field of view, or the optimiser found nothing)."""


@dataclass
class Registration:
    """A registration result: ``transform`` maps current-scan points (LPS mm) to prior-scan points."""

    transform: Any  # SimpleITK.Transform (composite: rigid then affine)
    lung_dice_before: float
    lung_dice_after: float
    metric_value: float
    seconds: float

    def prior_to_current(self, points_xyz_mm: Sequence[Sequence[float]]) -> np.ndarray:
        """Prior-scan points mapped into the current scan (the inverse of ``transform``)."""
        inverse = self.transform.GetInverse()
        return np.asarray([inverse.TransformPoint(tuple(float(v) for v in p)) for p in points_xyz_mm],
                          dtype=np.float64).reshape(-1, 3)

    def write(self, path: Any) -> Any:
        """Save ``transform`` as an ITK transform file (``.tfm``, read back with ``SimpleITK.ReadTransform``);
        written atomically. It maps current-scan points to prior-scan points, as ITK registrations do."""
        import SimpleITK as sitk

        from nodulenet.io.atomic import atomic_path

        with atomic_path(path) as tmp:
            sitk.WriteTransform(self.transform, str(tmp))
        return path

    def summary(self) -> dict[str, Any]:
        return {"method": "SimpleITK rigid (Euler3D) then affine, Mattes mutual information, lung-masked, "
                          f"{REGISTRATION_SPACING_MM:g} mm grid",
                "lung_dice_before": round(self.lung_dice_before, 4), "lung_dice_after": round(self.lung_dice_after, 4),
                "metric_value": round(self.metric_value, 5), "seconds": round(self.seconds, 2)}


def _image(volume: Volume, array: np.ndarray | None = None) -> Any:
    from nodulenet.preprocess.resample import volume_to_sitk

    return volume_to_sitk(volume if array is None else volume.with_array(array))


def _isotropic(image: Any, interpolator: Any, default: float) -> Any:
    import SimpleITK as sitk

    spacing = (REGISTRATION_SPACING_MM,) * 3
    size = [max(1, int(round(n * s / REGISTRATION_SPACING_MM))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), default, image.GetPixelID())


def _dice(fixed_mask: Any, moving_mask: Any, transform: Any) -> float:
    import SimpleITK as sitk

    moved = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0, fixed_mask.GetPixelID())
    a, b = sitk.GetArrayViewFromImage(fixed_mask) > 0, sitk.GetArrayViewFromImage(moved) > 0
    total = int(a.sum()) + int(b.sum())
    return 0.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def _method(fixed_mask: Any, moving_mask: Any, shrink: Sequence[int], iterations: int) -> Any:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, seed=17)  # seeded: the same scans give the same result
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel([max(0, s - 1) for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def register_scans(current: Volume, prior: Volume, current_lungs: np.ndarray, prior_lungs: np.ndarray,
                   *, affine: bool = True) -> Registration:
    """Register ``prior`` (moving) onto ``current`` (fixed); the lung masks are on each scan's own grid."""
    import SimpleITK as sitk

    t0 = time.perf_counter()
    lo, hi = HU_WINDOW
    fixed = _isotropic(sitk.Cast(_image(current, np.clip(current.array, lo, hi).astype(np.float32)), sitk.sitkFloat32),
                       sitk.sitkLinear, lo)
    moving = _isotropic(sitk.Cast(_image(prior, np.clip(prior.array, lo, hi).astype(np.float32)), sitk.sitkFloat32),
                        sitk.sitkLinear, lo)
    radius = max(1, int(round(LUNG_MARGIN_MM / REGISTRATION_SPACING_MM)))
    masks = []
    for volume, lungs in ((current, current_lungs), (prior, prior_lungs)):
        mask = _isotropic(_image(volume, (np.asarray(lungs) > 0).astype(np.uint8)), sitk.sitkNearestNeighbor, 0)
        masks.append(sitk.BinaryDilate(mask, [radius] * 3))
    fixed_mask, moving_mask = masks
    if int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask))) == 0 or \
            int(np.count_nonzero(sitk.GetArrayViewFromImage(moving_mask))) == 0:
        raise RegistrationError("a lung mask is empty: cannot register scans without lungs")
    rigid = sitk.CenteredTransformInitializer(fixed_mask, moving_mask, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    dice_before = _dice(fixed_mask, moving_mask, rigid)
    method = _method(fixed_mask, moving_mask, (4, 2, 1), 200)
    method.SetInitialTransform(rigid, inPlace=True)
    method.Execute(fixed, moving)
    metric = float(method.GetMetricValue())
    result = sitk.CompositeTransform(rigid)
    if affine:
        refine = sitk.AffineTransform(3)
        refine.SetCenter(rigid.GetCenter())
        stage = _method(fixed_mask, moving_mask, (2, 1), 150)
        stage.SetMovingInitialTransform(rigid)
        stage.SetInitialTransform(refine, inPlace=True)
        stage.Execute(fixed, moving)
        metric = float(stage.GetMetricValue())
        result = sitk.CompositeTransform([rigid, refine])
    dice_after = _dice(fixed_mask, moving_mask, result)
    seconds = time.perf_counter() - t0
    logger.info("registration: lung Dice %.3f -> %.3f, metric %.4f, %.1f s", dice_before, dice_after, metric, seconds)
    if dice_after < MIN_LUNG_DICE:
        raise RegistrationError(f"the scans do not show the same chest region: after registration their lungs "
                                f"overlap with Dice {dice_after:.2f} (< {MIN_LUNG_DICE}); check the fields of view "
                                f"and that both scans are of the same patient")
    return Registration(result, dice_before, dice_after, metric, seconds)
