"""The nodule table: a Qt model over a scan's findings, sortable by any column, filtered by a score threshold.

Columns (units in the header): id, score, long-axis diameter (mm), volume (mm³), centre x, y, z (world LPS mm),
side (the patient's right or left lung, from the body midline; "bone" / "outside the lungs" when the finding is
not in a lung), Im (the centre slice as a PACS numbers it: DICOM InstanceNumber, else z mm). Display text is
rounded; sorting uses the unrounded numbers (``SORT_ROLE``), and ``FINDING_ID_ROLE`` gives a row's finding id
whatever the sort order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, QPersistentModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QColor

from nodulenet.app.reslice import nodule_colour
from nodulenet.io.findings import NoduleFinding

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("id", "#", "finding id (its value in the label map, its DICOM SEG segment number)"),
    ("score", "score", "detection score, 0..1"),
    ("diameter_mm", "diam. mm", "long-axis diameter: the longest in-plane diameter of the mask, mm"),
    ("volume_mm3", "vol. mm³", "mask volume, mm³"),
    ("location", "centre x, y, z mm", "mask centre in world coordinates (DICOM LPS, mm)"),
    ("side", "side", "the patient's lung side (right or left of the body midline); flagged when not in a lung"),
    ("slice", "Im", "centre slice: its DICOM image number (InstanceNumber) as a PACS shows it, else its z in mm"),
)
SORT_ROLE = int(Qt.ItemDataRole.UserRole) + 1
FINDING_ID_ROLE = int(Qt.ItemDataRole.UserRole) + 2

Index = QModelIndex | QPersistentModelIndex


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def slice_text(f: NoduleFinding) -> str:
    """``73`` (the DICOM image number), ``z -99.5`` (mm, non-DICOM) or ``-``."""
    ref = f.centre_slice
    if ref is None:
        return "-"
    return str(ref.instance_number) if ref.instance_number is not None else f"z {ref.position_z_mm:.1f}"


class FindingsTableModel(QAbstractTableModel):
    """One row per finding, in the order given (predict gives them by descending score)."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._findings: list[NoduleFinding] = []

    def set_findings(self, findings: Sequence[NoduleFinding]) -> None:
        self.beginResetModel()
        self._findings = list(findings)
        self.endResetModel()

    def finding(self, row: int) -> NoduleFinding:
        return self._findings[row]

    @property
    def findings(self) -> list[NoduleFinding]:
        return list(self._findings)

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802 - Qt's name
        return 0 if parent.isValid() else len(self._findings)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return COLUMNS[section][1]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return COLUMNS[section][2]
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        f = self._findings[index.row()]
        key = COLUMNS[index.column()][0]
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(f, key)
        if role == SORT_ROLE:
            return self._sort_key(f, key)
        if role == FINDING_ID_ROLE:
            return f.id
        if role == Qt.ItemDataRole.DecorationRole and key == "id":
            return QColor(*nodule_colour(f.id))
        if role == Qt.ItemDataRole.TextAlignmentRole:
            left = key in ("side", "slice")
            return int((Qt.AlignmentFlag.AlignLeft if left else Qt.AlignmentFlag.AlignRight)
                       | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole:
            z, y, x = f.center_zyx
            return (f"finding {f.id}: score {f.score:.4f}; voxel z, y, x {z:.1f}, {y:.1f}, {x:.1f}; "
                    f"equivalent diameter {_number(f.equivalent_diameter_mm, 1)} mm; mean {_number(f.mean_hu, 0)} HU")
        return None

    @staticmethod
    def _text(f: NoduleFinding, key: str) -> str:
        if key == "id":
            return str(f.id)
        if key == "score":
            return f"{f.score:.3f}"
        if key == "diameter_mm":
            return _number(f.diameter_mm, 1)
        if key == "volume_mm3":
            return _number(f.volume_mm3, 0)
        if key == "location":
            x, y, z = f.center_world_xyz_mm
            return f"{x:.1f}, {y:.1f}, {z:.1f}"
        if key == "slice":
            return slice_text(f)
        if f.site not in (None, "lung"):
            return f.location_text
        return f.side or "-"

    @staticmethod
    def _sort_key(f: NoduleFinding, key: str) -> Any:
        if key == "location":
            # Head to feet, then right to left: the order a reader scrolls through the axial slices.
            x, y, z = f.center_world_xyz_mm
            return (-z, x)
        if key == "side":
            return f.location_text if f.site not in (None, "lung") else (f.side or "")
        if key == "slice":
            ref = f.centre_slice
            return float("-inf") if ref is None else float(ref.instance_number if ref.instance_number is not None
                                                           else ref.index)
        value = getattr(f, key)
        return float("-inf") if value is None else value


class FindingsFilterModel(QSortFilterProxyModel):
    """Sorts by the numbers behind the text and hides findings scoring below :attr:`threshold`."""

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._threshold = 0.0
        self.setSortRole(SORT_ROLE)

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_threshold(self, threshold: float) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9; invalidateRowsFilter is deprecated there
            self.beginFilterChange()
            self._threshold = float(threshold)
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._threshold = float(threshold)
            self.invalidateRowsFilter()

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:  # noqa: N802
        model = self.sourceModel()
        if not isinstance(model, FindingsTableModel):
            return True
        return model.finding(source_row).score >= self._threshold

    def lessThan(self, left: Index, right: Index) -> bool:  # noqa: N802
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        if isinstance(a, tuple) or isinstance(b, tuple):
            return tuple(a) < tuple(b)
        return a < b

    def visible_ids(self) -> list[int]:
        """Finding ids of the rows shown, in the order shown."""
        return [int(self.index(r, 0).data(FINDING_ID_ROLE)) for r in range(self.rowCount())]

    def row_of(self, finding_id: int) -> int | None:
        for r in range(self.rowCount()):
            if int(self.index(r, 0).data(FINDING_ID_ROLE)) == finding_id:
                return r
        return None
