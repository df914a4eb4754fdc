"""The DICOM files hospitals send: the real LIDC-IDRI-0001 series converted here to Enhanced CT multi-frame and
re-encoded in JPEG-LS / JPEG 2000 / RLE (identical HU to the classic read, exactly), a SEG referencing the
enhanced source's frames, corrupt compressed frames, a gantry-tilted phantom series (nodule within 1.5 mm) and
the choice of series in a study folder."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from _dicom_writers import (
    compress_file,
    corrupt_frame,
    lidc_variants,
    sample_tilted_slices,
    to_enhanced_ct,
    write_ct_slices,
    write_volume_as_series,
)
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from nodulenet.errors import InputError
from nodulenet.io.dicom import list_dicom_series, read_dicom_series
from nodulenet.io.findings import ModelInfo, NoduleMask, ScanFindings, ScanSource
from nodulenet.io.volume import Volume
from nodulenet.preprocess.phantom import PhantomConfig, make_phantom

# ---------------------------------------------------------------------------------------------- real series


@pytest.fixture(scope="module")
def classic(lidc_0001_series: Path) -> Volume:
    return read_dicom_series(lidc_0001_series)


@pytest.fixture(scope="module")
def variants(lidc_0001_series: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders holding LIDC-IDRI-0001 as: one Enhanced CT file (uncompressed, JPEG-LS lossless, JPEG 2000
    lossless), and classic slices in RLE lossless."""
    return lidc_variants(lidc_0001_series, tmp_path_factory.mktemp("lidc_variants"))


@pytest.mark.parametrize("variant", ["enhanced", "enhanced_jpegls", "enhanced_jpeg2000", "classic_rle"])
def test_lidc_variant_reads_the_same_hu_and_geometry(variant: str, variants: dict[str, Path], classic: Volume) -> None:
    folder = variants[variant]
    files = sorted(folder.glob("*.dcm"))
    syntax = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    expected_syntax = {"enhanced": "1.2.840.10008.1.2.1", "enhanced_jpegls": JPEGLSLossless,
                       "enhanced_jpeg2000": JPEG2000Lossless, "classic_rle": RLELossless}[variant]
    assert syntax == expected_syntax  # the premise: the files really are in that transfer syntax
    volume = read_dicom_series(folder)
    assert volume.array.dtype == classic.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, classic.array)  # exactly: lossless all the way
    assert volume.origin_xyz_mm == classic.origin_xyz_mm
    assert volume.spacing_zyx == classic.spacing_zyx
    assert volume.direction == classic.direction
    assert volume.meta["slice_positions_mm"] == classic.meta["slice_positions_mm"]
    assert volume.meta["padding_hu"] == classic.meta["padding_hu"] == -3024.0
    assert volume.meta["transfer_syntax_uid"] == str(expected_syntax)
    assert volume.meta["gantry_tilt_deg"] == 0.0 and not volume.meta["gantry_tilt_resampled"]
    if variant == "classic_rle":
        assert volume.meta["sop_instance_uids"] == classic.meta["sop_instance_uids"]
        assert volume.meta["frame_numbers"] == [None] * 133
        return
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    assert volume.meta["multi_frame"] is True
    assert volume.meta["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2.2"  # Legacy Converted Enhanced CT
    assert volume.meta["sop_instance_uids"] == [uid] * 133
    assert volume.meta["source_files"] == [str(files[0])] * 133
    # highdicom wrote the frames in the legacy InstanceNumber order, which runs head to feet in LIDC-IDRI-0001:
    # frame 1 is the top slice, so z index k (feet first) is frame 133 - k; a PACS shows those frame numbers.
    assert volume.meta["frame_numbers"] == list(range(133, 0, -1))
    assert volume.meta["instance_numbers"] == volume.meta["frame_numbers"]
    assert volume.meta["slice_locations_mm"] == classic.meta["slice_locations_mm"]
    assert volume.meta["slice_thickness_mm"] == 2.5  # from PixelMeasuresSequence, not the top level
    assert volume.meta["study_instance_uid"] == classic.meta["study_instance_uid"]
    assert volume.meta["frame_of_reference_uid"] == classic.meta["frame_of_reference_uid"]


def test_seg_of_an_enhanced_source_references_its_frames(variants: dict[str, Path], tmp_path: Path) -> None:
    from nodulenet.export.dicom_seg import write_dicom_seg
    from nodulenet.export.dicom_sr import write_dicom_sr
    from nodulenet.export.measurements import finding_from_mask

    volume = read_dicom_series(variants["enhanced"])
    source = pydicom.dcmread(volume.meta["source_files"][0], stop_before_pixels=True)
    # A 10 mm ball at the LUNA16 nodule of this scan (voxel (90, 367, 316), see test_io_dicom.py): slices 88-92.
    z, y, x = np.ogrid[:133, :512, :512]
    ball = ((z - 90) * 2.5) ** 2 + ((y - 367) * 0.703125) ** 2 + ((x - 316) * 0.703125) ** 2 <= 5.0**2
    finding = finding_from_mask(1, 0.9, NoduleMask(ball[80:100, 340:400, 290:350], (80, 340, 290)), volume)
    findings = ScanFindings(source=ScanSource.from_volume_meta(volume.meta), geometry=volume.geometry,
                            findings=[finding], model=ModelInfo(), threshold=0.5)
    seg_path = write_dicom_seg(findings, volume, tmp_path / "seg.dcm")
    seg = hd.seg.segread(seg_path)
    refs = [(str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID),
             int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber),
             [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
            for f in seg.PerFrameFunctionalGroupsSequence]
    slices = sorted({int(k) for k in np.flatnonzero(ball.any(axis=(1, 2)))})
    assert slices == [88, 89, 90, 91, 92]
    # each stored SEG frame derives from the source frame that holds that z slice (frame 133 - z)
    assert sorted(r[1] for r in refs) == sorted(133 - k for k in slices)
    assert all(r[0] == str(source.SOPInstanceUID) for r in refs)
    frames = source.PerFrameFunctionalGroupsSequence
    for _, number, position in refs:
        assert position == pytest.approx([float(v) for v in frames[number - 1].PlanePositionSequence[0]
                                          .ImagePositionPatient])
    # the SEG's voxels are the ball's: frame for source frame 133 - 90 = 43 holds the ball's middle slice
    middle = next(i for i, r in enumerate(refs) if r[1] == 43)
    np.testing.assert_array_equal(seg.pixel_array[middle].astype(bool) if seg.pixel_array.ndim == 3
                                  else seg.pixel_array.astype(bool), ball[90])
    sr = pydicom.dcmread(write_dicom_sr(findings, volume, seg_path, tmp_path / "sr.dcm"))
    evidence = [str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence]
    assert str(source.SOPInstanceUID) in evidence and str(seg.SOPInstanceUID) in evidence


# ---------------------------------------------------------------------------------------------- corrupt data


@pytest.fixture(scope="module")
def small_phantom():
    config = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                           slice_thickness_range_mm=(2.5, 2.5), n_nodules=1, nodule_kinds=("solid",),
                           diameter_range_mm=(10.0, 12.0))
    return make_phantom(4, config)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_corrupt_compressed_frame_is_one_error_naming_file_and_frame(syntax: str, small_phantom,
                                                                    tmp_path: Path) -> None:
    write_volume_as_series(small_phantom.image, tmp_path / "classic")
    files = sorted((tmp_path / "classic").glob("*.dcm"))[:8]
    enhanced = to_enhanced_ct(files, tmp_path / "enhanced.dcm")
    bad = compress_file(enhanced, tmp_path / "bad" / "ct.dcm", syntax)
    np.testing.assert_array_equal(read_dicom_series(bad.parent).array, small_phantom.image.array[:8])
    corrupt_frame(bad, 3)
    with pytest.raises(InputError) as err:
        read_dicom_series(bad.parent)
    message = str(err.value)
    assert err.value.path == bad and "\n" not in message
    assert "cannot decode the pixel data of frame 3 of 8" in message and syntax in message
    # a single-frame compressed slice: the file is named
    single = compress_file(files[2], tmp_path / "single" / files[2].name, syntax)
    for f in files[:2]:
        compress_file(f, tmp_path / "single" / f.name, syntax)
    corrupt_frame(single, 1)
    with pytest.raises(InputError, match="cannot decode the pixel data of the slice") as err:
        read_dicom_series(single.parent)
    assert err.value.path == single


def test_enhanced_frames_with_a_missing_position_are_refused(small_phantom, tmp_path: Path) -> None:
    write_volume_as_series(small_phantom.image, tmp_path / "classic")
    files = sorted((tmp_path / "classic").glob("*.dcm"))[:6]
    enhanced = to_enhanced_ct(files[:2] + files[3:], tmp_path / "gap" / "ct.dcm")  # frame 3 of 6 left out
    with pytest.raises(InputError, match="missing slice") as err:
        read_dicom_series(enhanced.parent)
    assert "ct.dcm frame 2" in str(err.value) and "ct.dcm frame 3" in str(err.value)


# ---------------------------------------------------------------------------------------------- gantry tilt


def _weighted_centre_world(volume: Volume, weights: np.ndarray) -> np.ndarray:
    idx = np.argwhere(weights > 0)
    centre = (idx * weights[weights > 0][:, None]).sum(axis=0) / weights[weights > 0].sum()
    return volume.voxel_to_world(centre)


@pytest.mark.parametrize("tilt_deg", [15.0, -22.0])
def test_gantry_tilted_series_puts_the_nodule_within_1_5_mm(tilt_deg: float, small_phantom, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A scanner with its gantry tilted records the phantom on tilted planes while the table moves along z;
    the reader resamples them onto an orthogonal grid. The phantom's nodule mask, recorded the same way (1000 in
    the nodule, 0 outside), must land with its centre within 1.5 mm of the true centre."""
    image, truth = small_phantom.image, small_phantom.nodules[0]
    origin = np.asarray(image.origin_xyz_mm)
    start = origin + np.array([0.0, 0.0, 5.0]) if tilt_deg > 0 else origin + np.array([0.0, 40.0, 5.0])
    mask = image.with_array((small_phantom.nodule_mask.array == truth.id).astype(np.float32) * 1000.0)
    kw = dict(n_slices=30, table_step_mm=2.5, first_position_xyz=start, rows=160, columns=160)
    hu_slices, positions, orientation = sample_tilted_slices(image, tilt_deg, fill=-1024.0, **kw)
    mask_slices, _, _ = sample_tilted_slices(mask, tilt_deg, fill=0.0, **kw)
    write_ct_slices(tmp_path / "ct", hu_slices, positions, orientation, (1.25, 1.25), gantry_tilt_deg=tilt_deg)
    write_ct_slices(tmp_path / "mask", mask_slices, positions, orientation, (1.25, 1.25), gantry_tilt_deg=tilt_deg)

    with caplog.at_level(logging.WARNING, logger="nodulenet.io.dicom"):
        ct = read_dicom_series(tmp_path / "ct")
    marked = read_dicom_series(tmp_path / "mask")
    assert ct.meta["gantry_tilt_resampled"] is True
    assert ct.meta["gantry_tilt_deg"] == pytest.approx(abs(tilt_deg), abs=0.01)
    assert any("gantry tilt" in r.getMessage() for r in caplog.records) and "gantry tilt" in ct.meta["warnings"][0]
    assert ScanSource.from_volume_meta(ct.meta).gantry_tilt_deg == pytest.approx(abs(tilt_deg), abs=0.01)
    # the corrected grid: the tilted planes' own axes, slices 2.5 cos(tilt) mm apart along their normal
    assert ct.spacing_zyx[0] == pytest.approx(2.5 * math.cos(math.radians(tilt_deg)), abs=1e-4)
    assert ct.shape_zyx[0] == 30 and ct.shape_zyx[1] > 160  # grown to hold every shifted slice
    weights = np.clip(marked.array.astype(np.float64) / 1000.0, 0.0, 1.0)
    weights[weights < 0.5] = 0.0
    centre = _weighted_centre_world(marked, weights)
    assert np.linalg.norm(centre - np.asarray(truth.center_world_xyz_mm)) < 1.5
    # the HU image: nodule tissue at the true centre, on the corrected grid
    z, y, x = np.round(ct.world_to_voxel(truth.center_world_xyz_mm)).astype(int)
    assert ct.array[z, y, x] > -300
    # the premise: reading the slices as an untilted stack would misplace the nodule by far more than 1.5 mm
    naive = np.stack(mask_slices) / 1000.0
    naive[naive < 0.5] = 0.0
    idx = np.argwhere(naive > 0)
    c = (idx * naive[naive > 0][:, None]).sum(axis=0) / naive[naive > 0].sum()
    naive_world = np.asarray(positions[0]) + np.array([c[2] * 1.25, c[1] * 1.25, c[0] * 2.5])
    assert np.linalg.norm(naive_world - np.asarray(truth.center_world_xyz_mm)) > 5.0


def test_seg_of_a_tilted_series_lies_on_its_tilted_source_slices(small_phantom, tmp_path: Path) -> None:
    """The findings live on the corrected grid; the SEG references the tilted source slices, so its frames must
    hold the nodule where those slices recorded it."""
    from nodulenet.export.dicom_seg import write_dicom_seg
    from nodulenet.export.measurements import finding_from_mask

    image, truth = small_phantom.image, small_phantom.nodules[0]
    mask = image.with_array((small_phantom.nodule_mask.array == truth.id).astype(np.float32) * 1000.0)
    kw = dict(n_slices=30, table_step_mm=2.5, first_position_xyz=np.asarray(image.origin_xyz_mm) + [0, 0, 5.0],
              rows=160, columns=160)
    mask_slices, positions, orientation = sample_tilted_slices(mask, 12.0, fill=0.0, **kw)
    write_ct_slices(tmp_path / "mask", mask_slices, positions, orientation, (1.25, 1.25), slice_thickness=2.5)
    marked = read_dicom_series(tmp_path / "mask")
    assert marked.meta["gantry_tilt_resampled"] and marked.shape_zyx[1] > 160
    nodule = marked.array > 500
    (z0, z1), (y0, y1), (x0, x1) = [(int(a.min()), int(a.max()) + 1) for a in np.nonzero(nodule)]
    finding = finding_from_mask(1, 0.9, NoduleMask(nodule[z0:z1, y0:y1, x0:x1], (z0, y0, x0)), marked)
    findings = ScanFindings(source=ScanSource.from_volume_meta(marked.meta), geometry=marked.geometry,
                            findings=[finding], model=ModelInfo(), threshold=0.5)
    seg = hd.seg.segread(write_dicom_seg(findings, marked, tmp_path / "seg.dcm"))
    z_of_uid = {uid: z for z, uid in enumerate(marked.meta["sop_instance_uids"])}
    on_source = np.zeros((30, 160, 160), dtype=bool)
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[np.newaxis]
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        on_source[z_of_uid[uid]] = frame.astype(bool)
    recorded = np.stack(mask_slices) > 500  # the nodule as the tilted slices recorded it, pixel for pixel
    dice = 2 * np.sum(on_source & recorded) / (on_source.sum() + recorded.sum())
    assert recorded.sum() > 100 and dice > 0.95


# ---------------------------------------------------------------------------------------------- series choice


def _series(folder: Path, n: int, step: float, **kwargs) -> str:
    hu = [np.full((8, 8), -500.0) for _ in range(n)]
    positions = [(0.0, 0.0, k * step) for k in range(n)]
    return write_ct_slices(folder, hu, positions, (1, 0, 0, 0, 1, 0), (0.7, 0.7), **kwargs)


def test_reader_choice_most_slices_then_thinnest_never_scout_capture_or_dose(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    thick = _series(tmp_path / "thick", 20, 2.5, slice_thickness=2.5, description="Chest 2.5", series_number=2)
    thin = _series(tmp_path / "thin", 20, 1.25, slice_thickness=1.25, description="Chest 1.25", series_number=3)
    # more images than either, but none of them is a CT volume
    scout = _series(tmp_path / "scout", 30, 1.0, slice_thickness=1.0, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    series_number=1)
    topogram = _series(tmp_path / "topo", 30, 1.0, slice_thickness=1.0, description="Topogram 0.6 T20f")
    capture = _series(tmp_path / "sc", 40, 1.0, slice_thickness=1.0, sop_class=SecondaryCaptureImageStorage,
                      image_type=("DERIVED", "SECONDARY"), description="Key images")
    dose = _series(tmp_path / "dose", 50, 1.0, slice_thickness=1.0, description="Dose Report",
                   image_type=("DERIVED", "SECONDARY", "OTHER"))
    infos = list_dicom_series(tmp_path)
    assert [i.series_instance_uid for i in infos][:2] == [thin, thick]
    assert {i.series_instance_uid for i in infos if not i.is_ct_volume} == {scout, topogram, capture, dose}
    with caplog.at_level(logging.INFO, logger="nodulenet.io.dicom"):
        volume = read_dicom_series(tmp_path)
    assert volume.meta["series_instance_uid"] == thin  # same count: the thinner slices win
    message = next(r.getMessage() for r in caplog.records if "passed over" in r.getMessage())
    assert thin in message.split("passed over")[0]
    assert all(uid in message.split("passed over")[1] for uid in (thick, scout, topogram, capture, dose))
    assert {s["series_instance_uid"] for s in volume.meta["other_series"]} == {thick, scout, topogram, capture, dose}
    # more slices beat thinner ones
    more = _series(tmp_path / "more", 24, 2.5, slice_thickness=3.0, description="Chest 3.0")
    assert read_dicom_series(tmp_path).meta["series_instance_uid"] == more
    assert read_dicom_series(tmp_path, thick).meta["series_instance_uid"] == thick
    # an enhanced file's frames count as slices
    files = sorted((tmp_path / "thick").glob("*.dcm"))
    enhanced = to_enhanced_ct(files + [], tmp_path / "enh" / "ct.dcm")
    info = next(i for i in list_dicom_series(tmp_path / "enh"))
    assert (info.num_files, info.num_slices, info.is_ct_volume) == (1, 20, True)
    assert os.path.exists(enhanced)
