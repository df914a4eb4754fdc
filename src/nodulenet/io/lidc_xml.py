"""Read the radiologists' annotations of an LIDC-IDRI CT series (``LidcReadMessage`` XML).

What one file holds: up to four blinded-then-unblinded reading sessions of one CT series. Each reader
marked, independently,

- nodules >= 3 mm as one outline (``roi``) per slice they appear on, plus nine 1-5/1-6 characteristic
  ratings (subtlety ... malignancy). Some readers left the ratings out; they are then ``None``;
- nodules < 3 mm as a single point (an ``unblindedReadNodule`` whose outline is one pixel, no ratings);
- non-nodules (other lesions) as a single point (``nonNodule/locus``).

Conventions (kept from the XML, converted only by :mod:`nodulenet.preprocess.lidc_nodules`):

- outline points are **pixel indices** ``(x, y)`` = (column, row) of the slice named by
  ``imageSOP_UID``; ``imageZposition`` is that slice's world z in mm (DICOM LPS). Nothing here knows the
  CT grid, so nothing is converted to world or voxel coordinates in this module;
- ``inclusion = FALSE`` marks an outline whose inside is *excluded* from the nodule (a hole/cavity).

The data set uses two XML namespaces (``http://www.nih.gov`` and ``http://www.nih.gov/idri``) and some
files carry none, so elements are matched by their local name only. Chest X-ray reads
(``IdriReadMessage`` with ``CXRreadingSession``) also sit in LIDC-IDRI folders; they raise
:class:`NotCtReadError` (an :class:`InputError`) so that :func:`find_lidc_xml` can skip them while any
other bad file is still reported. The XML is parsed with the standard library's expat-based parser,
which refuses external entities and (expat >= 2.4.1) entity-expansion bombs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nodulenet.errors import InputError

# Order of the ratings in the XML schema; also the keys of LidcCharacteristics.to_dict().
CHARACTERISTIC_NAMES: tuple[str, ...] = (
    "subtlety",
    "internal_structure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
# XML element name of each rating (camel case only for internalStructure).
_XML_CHARACTERISTIC = {n: ("internalStructure" if n == "internal_structure" else n) for n in CHARACTERISTIC_NAMES}


class NotCtReadError(InputError):
    """The file is well-formed XML but not an LIDC CT read: a chest X-ray read or another document."""


@dataclass(frozen=True)
class LidcRoi:
    """One outline on one slice: ``edge_xy`` pixel (column, row) points, in drawing order."""

    z_position_mm: float
    sop_instance_uid: str
    inclusion: bool
    edge_xy: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LidcCharacteristics:
    """The nine ratings a reader gave a nodule >= 3 mm; ``None`` where the reader left one out."""

    subtlety: int | None = None
    internal_structure: int | None = None
    calcification: int | None = None
    sphericity: int | None = None
    margin: int | None = None
    lobulation: int | None = None
    spiculation: int | None = None
    texture: int | None = None
    malignancy: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


@dataclass(frozen=True)
class LidcNodule:
    """A nodule >= 3 mm as outlined by one reader (one roi per slice; holes have ``inclusion=False``)."""

    nodule_id: str
    rois: tuple[LidcRoi, ...]
    characteristics: LidcCharacteristics | None


@dataclass(frozen=True)
class LidcPointFinding:
    """A finding marked by a point: a nodule < 3 mm (``kind='small_nodule'``) or a non-nodule.

    ``rois`` holds each marked point as a one-point :class:`LidcRoi` (a few small nodules are marked on
    more than one slice)."""

    finding_id: str
    kind: str  # "small_nodule" | "non_nodule"
    rois: tuple[LidcRoi, ...]


@dataclass(frozen=True)
class LidcReader:
    """One reading session. ``session_index`` (0-based order in the file) identifies the reader: the
    ``servicingRadiologistID`` strings are anonymised and not guaranteed unique."""

    session_index: int
    reader_id: str
    annotation_version: str
    nodules: tuple[LidcNodule, ...]
    small_nodules: tuple[LidcPointFinding, ...]
    non_nodules: tuple[LidcPointFinding, ...]


@dataclass(frozen=True)
class LidcReadMessage:
    """A parsed CT annotation file: which series it belongs to and every reader's marks."""

    path: Path
    series_instance_uid: str
    study_instance_uid: str
    readers: tuple[LidcReader, ...]


def _local(tag: Any) -> str:
    # ElementTree spells a namespaced tag "{uri}name"; comments/PIs have non-str tags.
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _children(elem: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in elem if _local(child.tag) == name)


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    return next(_children(elem, name), None)


def _text(elem: ET.Element, name: str) -> str | None:
    child = _child(elem, name)
    if child is None or child.text is None:
        return None
    text = child.text.strip()
    return text or None


def _required_text(path: Path, elem: ET.Element, name: str, where: str) -> str:
    text = _text(elem, name)
    if text is None:
        raise InputError(path, f"{where}: missing or empty <{name}>")
    return text


def _number(path: Path, text: str, what: str, kind: type[float] | type[int]) -> Any:
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"{what}: {text!r} is not a number") from None
    if kind is int:
        if value != int(value):
            raise InputError(path, f"{what}: {text!r} is not a whole number")
        return int(value)
    return value


def _point(path: Path, elem: ET.Element, where: str) -> tuple[int, int]:
    x = _number(path, _required_text(path, elem, "xCoord", where), f"{where} xCoord", int)
    y = _number(path, _required_text(path, elem, "yCoord", where), f"{where} yCoord", int)
    return (x, y)


def _parse_roi(path: Path, roi: ET.Element, where: str) -> LidcRoi:
    z = _number(path, _required_text(path, roi, "imageZposition", where), f"{where} imageZposition", float)
    sop = _required_text(path, roi, "imageSOP_UID", where)
    inclusion_text = (_text(roi, "inclusion") or "TRUE").upper()
    if inclusion_text not in ("TRUE", "FALSE"):
        raise InputError(path, f"{where}: <inclusion> must be TRUE or FALSE, got {inclusion_text!r}")
    edge = tuple(_point(path, e, f"{where} edgeMap") for e in _children(roi, "edgeMap"))
    if not edge:
        raise InputError(path, f"{where}: roi without any <edgeMap> point")
    return LidcRoi(z, sop, inclusion_text == "TRUE", edge)


def _parse_characteristics(path: Path, elem: ET.Element | None, where: str) -> LidcCharacteristics | None:
    if elem is None:
        return None
    values: dict[str, int | None] = {}
    for name in CHARACTERISTIC_NAMES:
        text = _text(elem, _XML_CHARACTERISTIC[name])
        values[name] = None if text is None else _number(path, text, f"{where} {name}", int)
    if all(v is None for v in values.values()):
        return None  # an empty <characteristics/> element says nothing
    return LidcCharacteristics(**values)


def _parse_session(path: Path, session: ET.Element, index: int) -> LidcReader:
    reader_id = _text(session, "servicingRadiologistID") or f"reader{index}"
    where_reader = f"reading session {index + 1} (reader {reader_id})"
    nodules: list[LidcNodule] = []
    small: list[LidcPointFinding] = []
    for k, nod in enumerate(_children(session, "unblindedReadNodule")):
        nodule_id = _text(nod, "noduleID") or f"nodule{k + 1}"
        where = f"{where_reader}, nodule {nodule_id}"
        rois = tuple(_parse_roi(path, r, where) for r in _children(nod, "roi"))
        if not rois:
            raise InputError(path, f"{where}: unblindedReadNodule without any <roi>")
        characteristics = _parse_characteristics(path, _child(nod, "characteristics"), where)
        # Classified by geometry, as the LIDC documentation defines it: a nodule < 3 mm is marked by
        # its centre point only. A few >= 3 mm outlines lack their ratings, so ratings cannot decide.
        if all(len(r.edge_xy) == 1 for r in rois):
            small.append(LidcPointFinding(nodule_id, "small_nodule", rois))
        else:
            nodules.append(LidcNodule(nodule_id, rois, characteristics))
    non_nodules: list[LidcPointFinding] = []
    for k, non in enumerate(_children(session, "nonNodule")):
        finding_id = _text(non, "nonNoduleID") or f"non-nodule{k + 1}"
        where = f"{where_reader}, non-nodule {finding_id}"
        z = _number(path, _required_text(path, non, "imageZposition", where), f"{where} imageZposition", float)
        sop = _required_text(path, non, "imageSOP_UID", where)
        loci = tuple(_point(path, e, f"{where} locus") for e in _children(non, "locus"))
        if len(loci) != 1:
            raise InputError(path, f"{where}: expected one <locus>, found {len(loci)}")
        non_nodules.append(LidcPointFinding(finding_id, "non_nodule", (LidcRoi(z, sop, True, loci),)))
    return LidcReader(
        session_index=index,
        reader_id=reader_id,
        annotation_version=_text(session, "annotationVersion") or "",
        nodules=tuple(nodules),
        small_nodules=tuple(small),
        non_nodules=tuple(non_nodules),
    )


def parse_lidc_xml(path: str | Path) -> LidcReadMessage:
    """Parse one LIDC-IDRI CT annotation file.

    Raises :class:`NotCtReadError` (an :class:`InputError`) for well-formed XML that is not an LIDC CT
    read (a chest X-ray read, another document) and :class:`InputError` for an unreadable or malformed
    file or one whose content breaks the schema (e.g. a non-numeric coordinate).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(path, f"not well-formed XML ({exc})") from None
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
    root_name = _local(root.tag)
    if root_name == "IdriReadMessage" or any(True for _ in _children(root, "CXRreadingSession")):
        raise NotCtReadError(path, "a chest X-ray read (IdriReadMessage/CXRreadingSession), not a CT read")
    if root_name != "LidcReadMessage":
        raise NotCtReadError(
            path, f"not an LIDC-IDRI annotation file (root element <{root_name}>, expected <LidcReadMessage>)"
        )
    header = _child(root, "ResponseHeader")
    if header is None:
        raise InputError(path, "LidcReadMessage without <ResponseHeader>")
    series_uid = _text(header, "SeriesInstanceUid") or _text(header, "SeriesInstanceUID")
    if series_uid is None:
        raise InputError(path, "<ResponseHeader> names no SeriesInstanceUid")
    study_uid = _text(header, "StudyInstanceUID") or _text(header, "StudyInstanceUid") or ""
    readers = tuple(_parse_session(path, s, i) for i, s in enumerate(_children(root, "readingSession")))
    return LidcReadMessage(path=path, series_instance_uid=series_uid, study_instance_uid=study_uid, readers=readers)


def find_lidc_xml(folder: str | Path, series_instance_uid: str | None = None) -> LidcReadMessage | None:
    """The parsed CT annotation file for ``series_instance_uid`` among the ``*.xml`` files of ``folder``.

    Chest X-ray reads, other XML documents and CT reads of other series are skipped. Returns ``None``
    when the folder holds no matching file (a series without annotations is valid input). Raises
    :class:`InputError` when two files match, or when nothing matches but some XML file is malformed (it
    may be the one wanted; silently treating the series as un-annotated would train on missing labels).
    With ``series_instance_uid=None`` the folder must hold at most one CT read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    matches: list[LidcReadMessage] = []
    unreadable: list[str] = []
    for xml_path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and p.is_file()):
        try:
            message = parse_lidc_xml(xml_path)
        except NotCtReadError:
            continue
        except InputError as exc:
            unreadable.append(f"{xml_path.name} ({exc.problem})")
            continue
        if series_instance_uid is None or message.series_instance_uid == series_instance_uid:
            matches.append(message)
    if len(matches) > 1:
        names = ", ".join(m.path.name for m in matches)
        raise InputError(folder, f"more than one LIDC CT annotation file for the series: {names}")
    if not matches and unreadable:
        raise InputError(folder, "no usable LIDC CT annotation file; unreadable: " + "; ".join(unreadable))
    return matches[0] if matches else None
