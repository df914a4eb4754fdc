"""LIDC-IDRI XML parsing: both namespaces, CXR reads skipped, bad files reported, real files.

Golden values of the real files were counted by hand in the XML text (``grep``), independently of the
parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodulenet.errors import InputError
from nodulenet.io.lidc_xml import NotCtReadError, find_lidc_xml, parse_lidc_xml

SERIES = "1.2.840.1.7"

CT_READ = """<?xml version="1.0" encoding="UTF-8"?>
<LidcReadMessage uid="1.1" {xmlns}>
<ResponseHeader>
  <Version>1.8.1</Version>
  <SeriesInstanceUid>{series}</SeriesInstanceUid>
  <StudyInstanceUID>1.2.840.1</StudyInstanceUID>
</ResponseHeader>
<readingSession>
  <annotationVersion>3.12</annotationVersion>
  <servicingRadiologistID>R1</servicingRadiologistID>
  <unblindedReadNodule>
    <noduleID>N1</noduleID>
    <characteristics>
      <subtlety>5</subtlety><internalStructure>1</internalStructure><calcification>6</calcification>
      <sphericity>3</sphericity><margin>4</margin><lobulation>2</lobulation><spiculation>1</spiculation>
      <texture>5</texture><malignancy>4</malignancy>
    </characteristics>
    <roi>
      <imageZposition>-100.000000 </imageZposition>
      <imageSOP_UID>1.2.840.1.7.1</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>10</xCoord><yCoord>20</yCoord></edgeMap>
      <edgeMap><xCoord>11</xCoord><yCoord>20</yCoord></edgeMap>
      <edgeMap><xCoord>11</xCoord><yCoord>21</yCoord></edgeMap>
    </roi>
    <roi>
      <imageZposition>-102.5</imageZposition>
      <imageSOP_UID>1.2.840.1.7.2</imageSOP_UID>
      <inclusion>FALSE</inclusion>
      <edgeMap><xCoord>12</xCoord><yCoord>22</yCoord></edgeMap>
      <edgeMap><xCoord>13</xCoord><yCoord>22</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
  <unblindedReadNodule>
    <noduleID>small</noduleID>
    <roi>
      <imageZposition>-90</imageZposition>
      <imageSOP_UID>1.2.840.1.7.3</imageSOP_UID>
      <inclusion>TRUE</inclusion>
      <edgeMap><xCoord>100</xCoord><yCoord>200</yCoord></edgeMap>
    </roi>
  </unblindedReadNodule>
  <nonNodule>
    <nonNoduleID>NN1</nonNoduleID>
    <imageZposition>-80.5</imageZposition>
    <imageSOP_UID>1.2.840.1.7.4</imageSOP_UID>
    <locus><xCoord>300</xCoord><yCoord>301</yCoord></locus>
  </nonNodule>
</readingSession>
<readingSession>
  <annotationVersion>3.12</annotationVersion>
  <servicingRadiologistID>R2</servicingRadiologistID>
</readingSession>
</LidcReadMessage>
"""

CXR_READ = """<?xml version="1.0" encoding="UTF-8"?>
<IdriReadMessage xmlns="http://www.nih.gov/idri">
<ResponseHeader><SeriesInstanceUid>{series}</SeriesInstanceUid></ResponseHeader>
<CXRreadingSession>
  <servicingRadiologistID>R9</servicingRadiologistID>
  <unblindedRead><noduleID>1</noduleID></unblindedRead>
</CXRreadingSession>
</IdriReadMessage>
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("xmlns", ['xmlns="http://www.nih.gov"', 'xmlns="http://www.nih.gov/idri"', ""])
def test_parses_ct_read_in_either_namespace(tmp_path: Path, xmlns: str) -> None:
    msg = parse_lidc_xml(_write(tmp_path, "a.xml", CT_READ.format(xmlns=xmlns, series=SERIES)))
    assert msg.series_instance_uid == SERIES
    assert msg.study_instance_uid == "1.2.840.1"
    assert [r.reader_id for r in msg.readers] == ["R1", "R2"]
    assert [r.session_index for r in msg.readers] == [0, 1]
    first = msg.readers[0]
    assert len(first.nodules) == 1 and len(first.small_nodules) == 1 and len(first.non_nodules) == 1
    nodule = first.nodules[0]
    assert nodule.nodule_id == "N1"
    assert [r.inclusion for r in nodule.rois] == [True, False]
    assert nodule.rois[0].z_position_mm == -100.0  # trailing blank in the XML text
    assert nodule.rois[0].sop_instance_uid == "1.2.840.1.7.1"
    assert nodule.rois[0].edge_xy == ((10, 20), (11, 20), (11, 21))
    assert nodule.characteristics is not None
    assert nodule.characteristics.to_dict() == {
        "subtlety": 5,
        "internal_structure": 1,
        "calcification": 6,
        "sphericity": 3,
        "margin": 4,
        "lobulation": 2,
        "spiculation": 1,
        "texture": 5,
        "malignancy": 4,
    }
    small = first.small_nodules[0]
    assert (small.kind, small.finding_id, small.rois[0].edge_xy) == ("small_nodule", "small", ((100, 200),))
    non = first.non_nodules[0]
    assert (non.kind, non.rois[0].z_position_mm, non.rois[0].edge_xy) == ("non_nodule", -80.5, ((300, 301),))
    assert msg.readers[1].nodules == () and msg.readers[1].non_nodules == ()


def test_outline_without_ratings_is_still_a_nodule(tmp_path: Path) -> None:
    # Some >= 3 mm outlines in LIDC carry no <characteristics>; only a one-pixel mark means "< 3 mm".
    text = CT_READ.format(xmlns="", series=SERIES)
    start, end = text.index("<characteristics>"), text.index("</characteristics>") + len("</characteristics>")
    msg = parse_lidc_xml(_write(tmp_path, "a.xml", text[:start] + text[end:]))
    assert len(msg.readers[0].nodules) == 1
    assert msg.readers[0].nodules[0].characteristics is None


def test_chest_xray_read_is_not_a_ct_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "cxr.xml", CXR_READ.format(series=SERIES))
    with pytest.raises(NotCtReadError, match="chest X-ray"):
        parse_lidc_xml(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<Annotations><Annotation/></Annotations>", "not an LIDC-IDRI annotation file"),
        ("<LidcReadMessage><ResponseHeader>", "not well-formed XML"),
        ("", "not well-formed XML"),
        ("<LidcReadMessage><readingSession/></LidcReadMessage>", "without <ResponseHeader>"),
    ],
)
def test_bad_files_raise_input_error_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path, "bad.xml", text)
    with pytest.raises(InputError, match=problem) as err:
        parse_lidc_xml(path)
    assert err.value.path == path
    assert "bad.xml" in str(err.value)


def test_non_numeric_coordinate_is_reported(tmp_path: Path) -> None:
    text = CT_READ.format(xmlns="", series=SERIES).replace("<xCoord>11</xCoord>", "<xCoord>eleven</xCoord>", 1)
    with pytest.raises(InputError, match=r"nodule N1 edgeMap xCoord: 'eleven' is not a number"):
        parse_lidc_xml(_write(tmp_path, "a.xml", text))


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read file"):
        parse_lidc_xml(tmp_path / "absent.xml")


def test_find_picks_the_ct_read_of_the_series(tmp_path: Path) -> None:
    _write(tmp_path, "001.xml", CXR_READ.format(series=SERIES))
    _write(tmp_path, "002.xml", CT_READ.format(xmlns='xmlns="http://www.nih.gov"', series="1.2.840.1.99"))
    _write(tmp_path, "003.xml", CT_READ.format(xmlns='xmlns="http://www.nih.gov"', series=SERIES))
    _write(tmp_path, "004.xml", "<Other/>")
    found = find_lidc_xml(tmp_path, SERIES)
    assert found is not None and found.path.name == "003.xml"
    assert find_lidc_xml(tmp_path, "1.2.840.1.98") is None  # a series without annotations
    with pytest.raises(InputError, match="more than one"):
        find_lidc_xml(tmp_path)  # without a series UID, two CT reads are ambiguous


def test_find_reports_a_malformed_xml_when_nothing_matches(tmp_path: Path) -> None:
    _write(tmp_path, "001.xml", CXR_READ.format(series=SERIES))
    _write(tmp_path, "069.xml", "<LidcReadMessage><ResponseHeader>")
    with pytest.raises(InputError, match=r"unreadable: 069.xml \(not well-formed XML"):
        find_lidc_xml(tmp_path, SERIES)
    (tmp_path / "069.xml").unlink()
    assert find_lidc_xml(tmp_path, SERIES) is None


def test_real_lidc_0001_xml(lidc_0001_series: Path) -> None:
    msg = find_lidc_xml(lidc_0001_series, "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192")
    assert msg is not None and msg.path.name == "069.xml"
    # Counted in 069.xml: per session, unblindedReadNodule with >1 edge point / single point, nonNodule.
    counts = [(len(r.nodules), len(r.small_nodules), len(r.non_nodules)) for r in msg.readers]
    assert counts == [(1, 3, 4), (1, 0, 1), (1, 3, 8), (1, 3, 0)]
    assert [r.reader_id for r in msg.readers] == ["540461523", "1428348137", "-750896469", "2103845659"]
    big = msg.readers[0].nodules[0]
    assert len(big.rois) == 8 and len(big.rois[0].edge_xy) == 76
    assert big.rois[0].edge_xy[0] == (312, 355) and big.rois[0].z_position_mm == -125.0
    assert big.characteristics is not None and big.characteristics.malignancy == 5


def test_real_lidc_0002_xml_has_holes(lidc_0002_series: Path) -> None:
    msg = find_lidc_xml(lidc_0002_series)
    assert msg is not None and msg.path.name == "071.xml"
    assert msg.series_instance_uid.endswith("619372068417051974713149104919")
    # The 4 readers' outlines: only sessions 3 and 4 outlined the large nodule; session 3 drew 2 holes.
    assert [len(r.nodules) for r in msg.readers] == [0, 0, 1, 1]
    holes = [roi for roi in msg.readers[2].nodules[0].rois if not roi.inclusion]
    assert len(msg.readers[2].nodules[0].rois) == 30 and len(holes) == 2
