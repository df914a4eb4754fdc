"""Rasterising LIDC outlines and grouping readers into nodules, on small hand-made cases.

Every expected pixel count, centre and box below was worked out by hand from the squares drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nodulenet.errors import InputError
from nodulenet.io.lidc_xml import parse_lidc_xml
from nodulenet.io.volume import Volume
from nodulenet.preprocess.lidc_nodules import lidc_findings, lidc_labels, rasterise_outline

SERIES = "1.2.826.0.1.5"
SPACING_ZYX = (2.0, 1.0, 1.0)
ORIGIN_XYZ = (10.0, 20.0, -50.0)


def square(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """Corner points of an axis-aligned square outline (the rasteriser joins them)."""
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def make_volume(nz: int = 8, size: int = 40, series: str = SERIES) -> Volume:
    meta = {
        "series_instance_uid": series,
        "sop_instance_uids": [f"{SERIES}.{k}" for k in range(nz)],
        "slice_positions_mm": [ORIGIN_XYZ[2] + SPACING_ZYX[0] * k for k in range(nz)],
    }
    return Volume(np.zeros((nz, size, size), np.int16), SPACING_ZYX, ORIGIN_XYZ, meta=meta)


def _roi(
    k: int, points: list[tuple[int, int]], inclusion: bool = True, sop: str | None = None, z: float | None = None
) -> str:
    z = ORIGIN_XYZ[2] + SPACING_ZYX[0] * k if z is None else z
    sop = f"{SERIES}.{k}" if sop is None else sop
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (
        f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
        f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
    )


def make_xml(tmp_path: Path, readers: list[list[str]], series: str = SERIES, name: str = "read.xml") -> Path:
    """``readers``: per reader, a list of ready-made ``unblindedReadNodule``/``nonNodule`` elements."""
    sessions = "".join(
        f"<readingSession><servicingRadiologistID>R{i}</servicingRadiologistID>{''.join(items)}</readingSession>"
        for i, items in enumerate(readers)
    )
    text = (
        '<LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
        f"<SeriesInstanceUid>{series}</SeriesInstanceUid></ResponseHeader>{sessions}</LidcReadMessage>"
    )
    path = tmp_path / name
    path.write_text(text)
    return path


def nodule(nodule_id: str, rois: list[str], malignancy: int | None = None) -> str:
    chars = "" if malignancy is None else f"<characteristics><malignancy>{malignancy}</malignancy></characteristics>"
    return f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def small(finding_id: str, k: int, x: int, y: int) -> str:
    return nodule(finding_id, [_roi(k, [(x, y)])])


# --------------------------------------------------------------------------------- rasterising


def test_square_outline_interior_and_filled_counts() -> None:
    # Outline through pixels 2..6 in x and y: 5x5 = 25 pixels in all, 16 on the outline, 3x3 = 9 inside.
    (y0, x0), interior, filled = rasterise_outline(square(2, 2, 6, 6), (10, 10))
    assert (filled.sum(), interior.sum()) == (25, 9)
    full = np.zeros((10, 10), bool)
    full[y0 : y0 + filled.shape[0], x0 : x0 + filled.shape[1]] = filled
    assert full[2:7, 2:7].all() and full.sum() == 25


def test_diagonal_outline_is_closed_under_8_connectivity() -> None:
    # Diamond |x-5| + |y-5| <= 3: rows of 1,3,5,7,5,3,1 = 25 pixels; 12 on the outline (|x-5|+|y-5| = 3).
    _, interior, filled = rasterise_outline([(5, 2), (8, 5), (5, 8), (2, 5)], (10, 10))
    assert (filled.sum(), interior.sum()) == (25, 13)


def test_degenerate_and_out_of_image_outlines() -> None:
    _, interior, filled = rasterise_outline([(3, 3), (6, 3)], (10, 10))  # a line: 4 pixels, no inside
    assert (filled.sum(), interior.sum()) == (4, 0)
    with pytest.raises(ValueError, match="leaves"):
        rasterise_outline(square(5, 5, 10, 8), (10, 10))


@pytest.mark.parametrize(("include_contour_pixels", "expected"), [(False, 40), (True, 80)])
def test_hole_outline_removes_its_inside(tmp_path: Path, include_contour_pixels: bool, expected: int) -> None:
    # Outer outline x,y = 1..9: 81 pixels, 32 on the outline, 49 inside. Hole outline 4..6: 9 pixels, 1 inside.
    # Outline pixels outside the nodule (default): 49 inside - 9 of the hole = 40.
    # Outline pixels part of the nodule: 81 - the hole's 1 inside pixel = 80.
    rois = [_roi(3, square(4, 4, 6, 6), inclusion=False), _roi(3, square(1, 1, 9, 9))]  # hole listed first
    xml = make_xml(tmp_path, [[nodule("N", rois)]])
    volume = make_volume()
    findings = lidc_findings(parse_lidc_xml(xml), volume)
    labels = lidc_labels(findings, volume, consensus="union", include_contour_pixels=include_contour_pixels)
    mask = labels.instance_mask.array
    assert int(mask.sum()) == expected and mask[3, 5, 5] == 0
    assert labels.nodules[0].volume_mm3 == expected * 2.0  # voxel = 2 x 1 x 1 mm
    # Centre and diameter never depend on the mask convention: interior voxels (40) define them.
    assert findings.nodules[0].diameter_mm == pytest.approx((6 * 40 * 2.0 / math.pi) ** (1 / 3))


# --------------------------------------------------------------------------------- grouping


def three_and_two_reader_case(tmp_path: Path) -> Path:
    # Nodule A on slices 2 and 3, outlined by readers 0, 1, 2 with slightly shifted 7x7 squares;
    # nodule B on slice 5, outlined by readers 0 and 1; reader 3 marked only a small nodule.
    a = [square(5, 5, 11, 11), square(6, 6, 12, 12), square(5, 6, 11, 12)]
    b = square(20, 20, 26, 26)
    readers = [
        [nodule("A0", [_roi(2, a[0]), _roi(3, a[0])], malignancy=3), nodule("B0", [_roi(5, b)], malignancy=1)],
        [nodule("A1", [_roi(2, a[1]), _roi(3, a[1])], malignancy=4), nodule("B1", [_roi(5, b)])],
        [nodule("A2", [_roi(3, a[2]), _roi(2, a[2])])],
        [small("s3", 6, 30, 30)],
    ]
    return make_xml(tmp_path, readers)


def test_readers_grouped_into_a_three_and_a_two_reader_nodule(tmp_path: Path) -> None:
    volume = make_volume()
    findings = lidc_findings(parse_lidc_xml(three_and_two_reader_case(tmp_path)), volume)
    assert [c.n_readers for c in findings.nodules] == [3, 2]  # sorted by centre z: A (z 2-3) before B (z 5)
    a, b = findings.nodules
    assert [o.nodule_id for o in a.outlines] == ["A0", "A1", "A2"]
    # Interior centres: A0 x=y=8, A1 x=y=9, A2 x=8 y=9; slices 2,3 -> z index 2.5 -> -50 + 2 * 2.5 = -45.
    assert a.center_world_xyz_mm == pytest.approx((10 + 25 / 3, 20 + 26 / 3, -45.0))
    # Each outline: 5x5 inside pixels on 2 slices = 50 voxels of 2 mm^3.
    assert a.diameter_mm == pytest.approx((6 * 100 / math.pi) ** (1 / 3))
    assert a.characteristics()["malignancy"] == pytest.approx(3.5)  # A2 gave no ratings
    assert a.characteristics()["texture"] is None
    assert b.center_world_xyz_mm == pytest.approx((33.0, 43.0, -40.0))
    assert len(findings.small_nodules) == 1 and findings.small_nodules[0][0].center_world_xyz_mm == (40.0, 50.0, -38.0)


def test_min_readers_and_consensus_masks(tmp_path: Path) -> None:
    volume = make_volume()
    findings = lidc_findings(parse_lidc_xml(three_and_two_reader_case(tmp_path)), volume)

    three = lidc_labels(findings, volume, min_readers=3, consensus="union")
    assert [r.n_readers for r in three.nodules] == [3]
    assert [r.n_readers for r in three.excluded_nodules] == [2]
    # Union of the three filled squares per slice: x 5..11 x y 5..12 (56) + column x=12, y 6..12 (7) = 63.
    assert int((three.instance_mask.array == 1).sum()) == 2 * 63
    assert three.nodules[0].bbox_zyx == (2, 5, 5, 4, 13, 13)
    assert int(three.instance_mask.array.max()) == 1

    two = lidc_labels(findings, volume, min_readers=2, consensus="majority")
    assert [r.id for r in two.nodules] == [1, 2] and two.excluded_nodules == ()
    # >= 2 of 3 interiors (x6-10,y6-10 / x7-11,y7-11 / x6-10,y7-11): 20 + 20 - 16 = 24 pixels per slice.
    assert int((two.instance_mask.array == 1).sum()) == 2 * 24
    # Two readers, same square: pylidc's 50 % keeps either reader's voxels -> the 5x5 inside.
    assert int((two.instance_mask.array == 2).sum()) == 25
    assert two.nodules[1].bbox_zyx == (5, 21, 21, 6, 26, 26)
    record = json.loads(json.dumps(two.to_dict()))["nodules"][0]
    assert record["reader_ids"] == ["R0", "R1", "R2"] and record["consensus"] == "majority"
    assert record["center_zyx"] == pytest.approx([2.5, 26 / 3, 25 / 3])

    with pytest.raises(ValueError, match="min_readers"):
        lidc_labels(findings, volume, min_readers=0)


def test_one_outline_per_reader_per_nodule(tmp_path: Path) -> None:
    # Reader 0 outlined two neighbouring nodules P (x 2-8) and Q (x 10-13); reader 1 drew one outline
    # over both (x 2-13). Connected components would merge all three. The big outline overlaps P best
    # (IoU 49/84) rather than Q (28/84), so the groups are {P, big} and {Q}.
    readers = [
        [nodule("P", [_roi(1, square(2, 2, 8, 8))]), nodule("Q", [_roi(1, square(10, 2, 13, 8))])],
        [nodule("big", [_roi(1, square(2, 2, 13, 8))])],
    ]
    findings = lidc_findings(parse_lidc_xml(make_xml(tmp_path, readers)), make_volume())
    groups = sorted(sorted(o.nodule_id for o in c.outlines) for c in findings.nodules)
    assert groups == [["P", "big"], ["Q"]]


def test_touching_outlines_link_within_tolerance(tmp_path: Path) -> None:
    # Same place, adjacent slices (2 mm apart in z): linked with the default tolerance (largest spacing,
    # 2 mm); not with 1.5 mm.
    readers = [[nodule("a", [_roi(2, square(5, 5, 9, 9))])], [nodule("b", [_roi(3, square(5, 5, 9, 9))])]]
    message = parse_lidc_xml(make_xml(tmp_path, readers))
    assert [c.n_readers for c in lidc_findings(message, make_volume()).nodules] == [2]
    assert [c.n_readers for c in lidc_findings(message, make_volume(), tol_mm=1.5).nodules] == [1, 1]


def test_point_marks_grouped_by_distance(tmp_path: Path) -> None:
    # Small-nodule marks 2 px (2 mm) apart by readers 0 and 1 -> one finding; reader 2's is 20 mm away.
    readers = [[small("a", 4, 10, 10)], [small("b", 4, 12, 10)], [small("c", 4, 30, 10)]]
    findings = lidc_findings(parse_lidc_xml(make_xml(tmp_path, readers)), make_volume())
    assert sorted(len(g) for g in findings.small_nodules) == [1, 2]
    labels = lidc_labels(findings, make_volume())
    pair = next(p for p in labels.small_nodules if p.n_readers == 2)
    assert pair.center_world_xyz_mm == pytest.approx((21.0, 30.0, -42.0))
    assert pair.center_zyx == pytest.approx((4.0, 10.0, 11.0))


# --------------------------------------------------------------------------------- mismatches


def test_roi_found_by_z_when_its_sop_uid_is_unknown(tmp_path: Path) -> None:
    # z = -43.3 is 0.7 mm from slice 3 (-44): within half a slice (1 mm).
    readers = [[nodule("a", [_roi(3, square(5, 5, 9, 9), sop="9.9.9", z=-43.3)])]]
    findings = lidc_findings(parse_lidc_xml(make_xml(tmp_path, readers)), make_volume())
    assert findings.nodules[0].outlines[0].box[0] == 3


def test_roi_on_no_slice_of_the_series_is_input_error(tmp_path: Path) -> None:
    # Slices lie at -50 ... -36 mm; -53 mm is 3 mm below the first, more than half a slice (1 mm).
    readers = [[nodule("a", [_roi(3, square(5, 5, 9, 9), sop="9.9.9", z=-53.0)])]]
    path = make_xml(tmp_path, readers, name="069.xml")
    with pytest.raises(InputError, match="not a slice of this series") as err:
        lidc_findings(parse_lidc_xml(path), make_volume())
    assert err.value.path == path


def test_xml_of_another_series_is_input_error(tmp_path: Path) -> None:
    path = make_xml(tmp_path, [[nodule("a", [_roi(3, square(5, 5, 9, 9))])]], series="1.2.3.4")
    with pytest.raises(InputError, match="annotates series 1.2.3.4, but the scan is series") as err:
        lidc_findings(parse_lidc_xml(path), make_volume())
    assert err.value.path == path


def test_outline_outside_the_image_is_input_error(tmp_path: Path) -> None:
    path = make_xml(tmp_path, [[nodule("a", [_roi(3, square(30, 30, 45, 35))])]])
    with pytest.raises(InputError, match="leaves the 40x40 image"):
        lidc_findings(parse_lidc_xml(path), make_volume())


def test_outline_without_strict_inside_counts_its_pixels(tmp_path: Path) -> None:
    # A 2x2-pixel outline has no pixel strictly inside; its 4 pixels (4 voxels of 2 mm^3) are the nodule
    # for the centre, the diameter and the masks of either convention.
    xml = make_xml(tmp_path, [[nodule("tiny", [_roi(4, square(3, 3, 4, 4))])]])
    volume = make_volume()
    findings = lidc_findings(parse_lidc_xml(xml), volume)
    assert findings.nodules[0].diameter_mm == pytest.approx((6 * 8.0 / math.pi) ** (1 / 3))
    assert findings.nodules[0].center_world_xyz_mm == pytest.approx((13.5, 23.5, -42.0))
    for consensus in ("union", "majority"):
        labels = lidc_labels(findings, volume, consensus=consensus)  # type: ignore[arg-type]
        assert int(labels.instance_mask.array.sum()) == 4
        assert labels.nodules[0].bbox_zyx == (4, 3, 3, 5, 5, 5)
