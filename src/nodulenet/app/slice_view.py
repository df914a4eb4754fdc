"""One 2D view of the scan (axial, coronal or sagittal), drawn with QPainter on a QImage.

Why QPainter and not a VTK reslice view: the slices are patient-aligned cuts of the array (:mod:`.reslice`, no
resampling), so there is nothing for VTK's reslicing to do; the overlays (per-voxel-edge outlines, boxes, score
text, side letters) are a few hundred QPainter lines; a frame of a 512 x 512 slice with 98 findings costs 6-10 ms
where VTK's image slice renderer took 26 ms without overlays (``benchmarks/viewer_render.py``, software OpenGL);
and a plain QWidget can be grabbed (``QWidget.grab``) for screenshots and tests, which a VTK widget cannot.

Mouse and keys:

- left button: put the crosshair there (every view follows); Shift + left drag or middle drag: pan;
- right drag: window/level (right-left: width, up-down: level);
- wheel or Up/Down/PageUp/PageDown: scroll slices; Ctrl + wheel: zoom about the pointer; double-click: reset zoom.

Overlays, per finding id with its own colour (:func:`.reslice.nodule_colour`): mask outlines along the voxel edges
or a translucent fill plus outline, the 3D box projected as a rectangle with the score, and the crosshair.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from PySide6.QtCore import QLineF, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QFont, QImage, QKeyEvent, QMouseEvent, QPainter, QPen, QWheelEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

from nodulenet.app.reslice import (
    CROSSHAIR_COLOUR,
    LETTER_COLOUR,
    WINDOW_PRESETS,
    PatientAxes,
    nodule_colour,
    outline_segments,
    window_to_uint8,
)
from nodulenet.io.findings import NoduleFinding

MASK_STYLES = ("outline", "fill", "off")
FILL_ALPHA = 90
MIN_ZOOM, MAX_ZOOM = 0.5, 20.0


class SliceView(QWidget):
    """A patient-aligned slice with overlays. Coordinates given to and from it are voxel ``(z, y, x)``."""

    cursor_moved = Signal(object)  # (z, y, x) voxel the user clicked
    window_changed = Signal(float, float)  # width, level (HU) after a right drag
    slice_changed = Signal(int)

    def __init__(self, view: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = view
        self.setObjectName(f"{view}_view")
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self._array: np.ndarray | None = None
        self.axes: PatientAxes | None = None
        self._index = 0
        self._cursor: tuple[float, float, float] | None = None
        self.window_width, self.window_level = WINDOW_PRESETS["Lung"]
        self._labels: np.ndarray | None = None
        self._findings: list[NoduleFinding] = []
        self._visible: set[int] = set()
        self.selected_id: int | None = None
        self.mask_style = "outline"
        self.show_boxes = True
        self.show_crosshair = True
        self.zoom = 1.0
        self._pan = QPointF(0.0, 0.0)
        self._drag: tuple[str, QPointF, tuple[float, float]] | None = None
        self._grey_cache: tuple[tuple[int, float, float], QImage] | None = None
        self.hover_text = ""
        self._image_numbers: list[int | None] | None = None

    # ----------------------------------------------------------------------------------------- data

    def set_volume(self, array: np.ndarray | None, axes: PatientAxes | None) -> None:
        """Show ``array`` (HU, ``(z, y, x)``) with its axes; None clears the view. Resets zoom and overlays."""
        self._array, self.axes = array, axes
        self._labels, self._findings, self._visible, self.selected_id = None, [], set(), None
        self._grey_cache = None
        self._image_numbers = None
        self.reset_zoom()
        if axes is not None:
            self._index = axes.slice_count(self.view) // 2
            self._cursor = tuple(s / 2.0 for s in axes.shape_zyx)  # type: ignore[assignment]
        self.update()

    def set_image_numbers(self, numbers: Sequence[int | None] | None) -> None:
        """The DICOM image number (InstanceNumber) of each slice of this view, in its index order; the slice
        counter then shows it as a PACS does (``Im 73``). None: no numbers (non-DICOM, or not this view's axis)."""
        if numbers is not None and self.axes is not None and len(numbers) != self.axes.slice_count(self.view):
            raise ValueError(f"{len(numbers)} image numbers for {self.axes.slice_count(self.view)} slices")
        self._image_numbers = None if numbers is None else [None if n is None else int(n) for n in numbers]
        self.update()

    def image_number(self) -> int | None:
        """The DICOM image number of the slice shown, when known."""
        if not self._image_numbers or not 0 <= self._index < len(self._image_numbers):
            return None
        return self._image_numbers[self._index]

    def slice_counter_text(self) -> str:
        """``Axial  189/261  Im 73``: the position in this view, and the PACS image number when known."""
        n = self.axes.slice_count(self.view) if self.axes is not None else 0
        number = self.image_number()
        return f"{self.view.capitalize()}  {self._index + 1}/{n}" + ("" if number is None else f"  Im {number}")

    def set_overlays(self, labels: np.ndarray | None, findings: Sequence[NoduleFinding]) -> None:
        """The label map (value = finding id, same grid as the volume) and the findings (for boxes and scores)."""
        if labels is not None and self._array is not None and labels.shape != self._array.shape:
            raise ValueError(f"label map {labels.shape} is not on the scan grid {self._array.shape}")
        self._labels = labels
        self._findings = list(findings)
        self._visible = {f.id for f in self._findings}
        self.update()

    def set_visible_ids(self, ids: Iterable[int]) -> None:
        self._visible = set(int(i) for i in ids)
        self.update()

    def set_selected(self, finding_id: int | None) -> None:
        self.selected_id = finding_id
        self.update()

    def set_overlay_style(self, mask_style: str | None = None, boxes: bool | None = None,
                          crosshair: bool | None = None) -> None:
        if mask_style is not None:
            if mask_style not in MASK_STYLES:
                raise ValueError(f"mask style must be one of {MASK_STYLES}, got {mask_style!r}")
            self.mask_style = mask_style
        if boxes is not None:
            self.show_boxes = bool(boxes)
        if crosshair is not None:
            self.show_crosshair = bool(crosshair)
        self.update()

    def set_window(self, width: float, level: float) -> None:
        self.window_width, self.window_level = max(1.0, float(width)), float(level)
        self.update()

    @property
    def slice_index(self) -> int:
        """The array index along the axis this view cuts (z for a usual axial scan's axial view)."""
        return self._index

    def set_slice_index(self, index: int) -> None:
        if self.axes is None:
            return
        index = int(np.clip(index, 0, self.axes.slice_count(self.view) - 1))
        if index != self._index:
            self._index = index
            if self._cursor is not None:
                cursor = list(self._cursor)
                cursor[self.axes.normal_axis(self.view)] = float(index)
                self._cursor = tuple(cursor)  # type: ignore[assignment]
            self.slice_changed.emit(index)
            self.update()

    def set_cursor(self, zyx: Sequence[float]) -> None:
        """Move the crosshair to voxel ``zyx`` and the slice through it."""
        if self.axes is None:
            return
        self._cursor = (float(zyx[0]), float(zyx[1]), float(zyx[2]))
        self.set_slice_index(int(round(self._cursor[self.axes.normal_axis(self.view)])))
        self.update()

    @property
    def cursor(self) -> tuple[float, float, float] | None:
        return self._cursor

    def ensure_visible(self, zyx: Sequence[float], margin: float = 24.0) -> None:
        """Pan so that voxel ``zyx`` is inside the view (unchanged when it already is)."""
        if self.axes is None:
            return
        point = self.voxel_to_widget(zyx)
        inside = margin <= point.x() <= self.width() - margin and margin <= point.y() <= self.height() - margin
        if not inside:
            self._pan += QPointF(self.width() / 2.0 - point.x(), self.height() / 2.0 - point.y())
            self.update()

    def reset_zoom(self) -> None:
        self.zoom = 1.0
        self._pan = QPointF(0.0, 0.0)
        self.update()

    # ------------------------------------------------------------------------------------- geometry

    def image_rect(self) -> QRectF:
        """Where the slice image lies in widget pixels (aspect from the voxel size in mm)."""
        if self.axes is None:
            return QRectF()
        rows, cols = self.axes.image_shape(self.view)
        row_mm, col_mm = self.axes.pixel_spacing(self.view)
        height_mm, width_mm = rows * row_mm, cols * col_mm
        scale = min(self.width() / width_mm, self.height() / height_mm) * self.zoom
        w, h = width_mm * scale, height_mm * scale
        return QRectF((self.width() - w) / 2.0 + self._pan.x(), (self.height() - h) / 2.0 + self._pan.y(), w, h)

    def _display_to_widget(self, row: float, col: float) -> QPointF:
        rect = self.image_rect()
        rows, cols = self.axes.image_shape(self.view)  # type: ignore[union-attr]
        return QPointF(rect.left() + (col + 0.5) * rect.width() / cols, rect.top() + (row + 0.5) * rect.height() / rows)

    def voxel_to_widget(self, zyx: Sequence[float]) -> QPointF:
        """Widget pixel of a voxel (its in-plane position; the slice index is ignored)."""
        row, col, _ = self.axes.voxel_to_display(self.view, zyx)  # type: ignore[union-attr]
        return self._display_to_widget(row, col)

    def widget_to_voxel(self, point: QPointF) -> tuple[float, float, float]:
        """Voxel ``(z, y, x)`` under a widget pixel, on the current slice."""
        rect = self.image_rect()
        rows, cols = self.axes.image_shape(self.view)  # type: ignore[union-attr]
        col = (point.x() - rect.left()) * cols / rect.width() - 0.5
        row = (point.y() - rect.top()) * rows / rect.height() - 0.5
        return self.axes.display_to_voxel(self.view, row, col, float(self._index))  # type: ignore[union-attr]

    def pixels_per_mm(self) -> float:
        if self.axes is None:
            return 0.0
        rows, _ = self.axes.image_shape(self.view)
        row_mm, _ = self.axes.pixel_spacing(self.view)
        return self.image_rect().height() / (rows * row_mm)

    # -------------------------------------------------------------------------------------- drawing

    def _grey_image(self) -> QImage:
        key = (self._index, self.window_width, self.window_level)
        if self._grey_cache is None or self._grey_cache[0] != key:
            grey = window_to_uint8(self.axes.slice_image(self._array, self.view, self._index),  # type: ignore
                                   self.window_width, self.window_level)
            image = QImage(grey.data, grey.shape[1], grey.shape[0], grey.strides[0], QImage.Format.Format_Grayscale8)
            self._grey_cache = (key, image.copy())  # copy: the QImage must not outlive the numpy buffer
        return self._grey_cache[1]

    def paintEvent(self, event: object) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.GlobalColor.black)
        if self._array is None or self.axes is None:
            painter.setPen(QColor(150, 150, 150))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, f"{self.view}\n(open a scan)")
            painter.end()
            return
        rect = self.image_rect()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        painter.drawImage(rect, self._grey_image())
        # Overlays without smoothing or antialiasing: a nodule's colour is drawn exactly, never blended.
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
        if self._labels is not None and self.mask_style != "off":
            self._draw_masks(painter, rect)
        if self.show_boxes:
            self._draw_boxes(painter)
        if self.show_crosshair and self._cursor is not None:
            self._draw_crosshair(painter)
        self._draw_text(painter)
        painter.end()

    def _draw_masks(self, painter: QPainter, rect: QRectF) -> None:
        labels = self.axes.slice_image(self._labels, self.view, self._index)  # type: ignore[union-attr]
        # One pass finds every finding's box on this slice; outlines are then traced in those small boxes only
        # (tracing each finding over the whole 512 x 512 slice cost 20 ms a frame with 100 findings).
        boxes = ndimage.find_objects(labels)
        ids = [k + 1 for k, box in enumerate(boxes) if box is not None and k + 1 in self._visible]
        if not ids:
            return
        if self.mask_style == "fill":
            lut = np.zeros((len(boxes) + 1, 4), dtype=np.uint8)  # invisible findings stay transparent
            for i in ids:
                lut[i] = (*nodule_colour(i), FILL_ALPHA)
            rgba = np.ascontiguousarray(lut[labels])
            image = QImage(rgba.data, rgba.shape[1], rgba.shape[0], rgba.strides[0], QImage.Format.Format_RGBA8888)
            painter.drawImage(rect, image.copy())
        rows, cols = labels.shape
        sx, sy = rect.width() / cols, rect.height() / rows
        for i in ids:
            box = boxes[i - 1]
            segments = outline_segments(labels[box] == i)
            # crop (row, col) -> slice (row, col) -> widget (x, y); pixel edges at +-0.5 map onto the rect's edges.
            rows0, cols0 = box[0].start + 0.5, box[1].start + 0.5
            xs0 = rect.left() + (segments[:, 1] + cols0) * sx
            ys0 = rect.top() + (segments[:, 0] + rows0) * sy
            xs1 = rect.left() + (segments[:, 3] + cols0) * sx
            ys1 = rect.top() + (segments[:, 2] + rows0) * sy
            painter.setPen(QPen(QColor(*nodule_colour(i)), 3 if i == self.selected_id else 2))
            painter.drawLines([QLineF(a, b, c, d) for a, b, c, d in zip(xs0, ys0, xs1, ys1)])

    def _draw_boxes(self, painter: QPainter) -> None:
        font = QFont(painter.font())
        font.setPointSize(8)
        painter.setFont(font)
        for f in self._findings:
            if f.id not in self._visible or not self.axes.box_on_slice(self.view, f.box_zyx, self._index):  # type: ignore
                continue
            r0, c0, r1, c1 = self.axes.box_rectangle(self.view, f.box_zyx)  # type: ignore[union-attr]
            top_left = self._display_to_widget(r0, c0)
            bottom_right = self._display_to_widget(r1, c1)
            colour = QColor(*nodule_colour(f.id))
            pen = QPen(colour, 2 if f.id == self.selected_id else 1, Qt.PenStyle.DashLine)
            painter.setPen(pen)
            box = QRectF(top_left, bottom_right).adjusted(-3, -3, 3, 3)
            painter.drawRect(box)
            text = f"#{f.id} {f.score:.2f}"
            metrics = painter.fontMetrics()
            label = QRectF(box.left(), box.top() - metrics.height() - 2, metrics.horizontalAdvance(text) + 6,
                           metrics.height())
            # A tag in the nodule's colour, black or white text by its brightness: legible on bone and air alike.
            painter.fillRect(label, colour)
            r, g, b = nodule_colour(f.id)
            painter.setPen(QColor(0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else QColor(255, 255, 255))
            painter.drawText(label, Qt.AlignmentFlag.AlignCenter, text)

    def _draw_crosshair(self, painter: QPainter) -> None:
        centre = self.voxel_to_widget(self._cursor)  # type: ignore[arg-type]
        gap = 12.0  # leave the point itself clear, so the crosshair never hides what it points at
        painter.setPen(QPen(QColor(*CROSSHAIR_COLOUR), 1, Qt.PenStyle.DotLine))
        w, h = float(self.width()), float(self.height())
        painter.drawLines([QLineF(0, centre.y(), centre.x() - gap, centre.y()),
                           QLineF(centre.x() + gap, centre.y(), w, centre.y()),
                           QLineF(centre.x(), 0, centre.x(), centre.y() - gap),
                           QLineF(centre.x(), centre.y() + gap, centre.x(), h)])

    @staticmethod
    def _label(painter: QPainter, area: QRectF, align: Qt.AlignmentFlag, text: str) -> None:
        """Text on a dark backing, so it reads on white bone as on black air."""
        bounds = painter.boundingRect(area, int(align), text).adjusted(-3, -1, 3, 1)
        painter.fillRect(bounds, QColor(0, 0, 0, 170))
        painter.drawText(bounds, int(Qt.AlignmentFlag.AlignCenter), text)

    def _draw_text(self, painter: QPainter) -> None:
        letters = self.axes.edge_letters(self.view)  # type: ignore[union-attr]
        font = QFont(painter.font())
        font.setPointSize(11)
        font.setBold(True)
        painter.setFont(font)
        painter.setPen(QColor(*LETTER_COLOUR))
        area = QRectF(self.rect().adjusted(4, 3, -4, -3))
        a = Qt.AlignmentFlag
        self._label(painter, area, a.AlignLeft | a.AlignVCenter, letters["left"])
        self._label(painter, area, a.AlignRight | a.AlignVCenter, letters["right"])
        self._label(painter, area, a.AlignHCenter | a.AlignTop, letters["top"])
        self._label(painter, area, a.AlignHCenter | a.AlignBottom, letters["bottom"])
        font.setPointSize(8)
        font.setBold(False)
        painter.setFont(font)
        painter.setPen(QColor(220, 220, 220))
        self._label(painter, area, a.AlignLeft | a.AlignTop, self.slice_counter_text())
        self._label(painter, area, a.AlignLeft | a.AlignBottom, f"W {self.window_width:.0f}  L {self.window_level:.0f}")

    # ---------------------------------------------------------------------------------- interaction

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if self.axes is None:
            return
        pos = event.position()
        button = event.button()
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        if button == Qt.MouseButton.MiddleButton or (button == Qt.MouseButton.LeftButton and shift):
            self._drag = ("pan", pos, (self._pan.x(), self._pan.y()))
        elif button == Qt.MouseButton.RightButton:
            self._drag = ("window", pos, (self.window_width, self.window_level))
        elif button == Qt.MouseButton.LeftButton:
            self._drag = ("cursor", pos, (0.0, 0.0))
            self._move_cursor_to(pos)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        pos = event.position()
        if self._drag is None:
            self._update_hover(pos)
            return
        kind, start, values = self._drag
        dx, dy = pos.x() - start.x(), pos.y() - start.y()
        if kind == "pan":
            self._pan = QPointF(values[0] + dx, values[1] + dy)
            self.update()
        elif kind == "window":
            # 4 HU per pixel: a drag across a view spans the useful range of widths and levels.
            self.set_window(values[0] + 4.0 * dx, values[1] - 4.0 * dy)
            self.window_changed.emit(self.window_width, self.window_level)
        else:
            self._move_cursor_to(pos)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self._drag = None

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self.reset_zoom()

    def _move_cursor_to(self, pos: QPointF) -> None:
        zyx = self.widget_to_voxel(pos)
        shape = self.axes.shape_zyx  # type: ignore[union-attr]
        zyx = tuple(float(np.clip(v, 0, s - 1)) for v, s in zip(zyx, shape))
        self._cursor = zyx  # type: ignore[assignment]
        self.update()
        self.cursor_moved.emit(zyx)

    def _update_hover(self, pos: QPointF) -> None:
        if self.axes is None or self._array is None:
            return
        zyx = np.round(self.widget_to_voxel(pos)).astype(int)
        if np.all(zyx >= 0) and np.all(zyx < np.asarray(self.axes.shape_zyx)):
            self.hover_text = f"voxel z,y,x {zyx[0]}, {zyx[1]}, {zyx[2]}: {self._array[tuple(zyx)]:.0f} HU"
        else:
            self.hover_text = ""

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        steps = event.angleDelta().y() / 120.0
        if steps == 0:
            return
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.zoom_about(event.position(), 1.25 ** steps)
        else:
            self.set_slice_index(self._index + (1 if steps > 0 else -1) * max(1, int(abs(steps))))

    def zoom_about(self, point: QPointF, factor: float) -> None:
        """Zoom by ``factor`` keeping the scan point under ``point`` where it is."""
        old = self.zoom
        self.zoom = float(np.clip(old * factor, MIN_ZOOM, MAX_ZOOM))
        ratio = self.zoom / old
        centre = QPointF(self.width() / 2.0, self.height() / 2.0)
        # The image centre sits at centre + pan; scaling about `point` moves it to point + (c - point) * ratio.
        image_centre = centre + self._pan
        new_centre = point + (image_centre - point) * ratio
        self._pan = new_centre - centre
        self.update()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        step = {Qt.Key.Key_Up: 1, Qt.Key.Key_Down: -1, Qt.Key.Key_PageUp: 10, Qt.Key.Key_PageDown: -10}
        if event.key() in step:
            self.set_slice_index(self._index + step[event.key()])
        else:
            super().keyPressEvent(event)
