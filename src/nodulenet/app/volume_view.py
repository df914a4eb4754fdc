"""The 3D view (VTK in Qt): the chest as lung surfaces or a volume rendering, the nodules as coloured surfaces,
and the three slice planes of the 2D views.

Everything is placed in world coordinates (LPS mm): each actor gets the scan's voxel-to-world matrix
(direction x spacing, origin) as its user matrix, so a flipped or permuted scan shows the patient the right way
round. The camera looks from the front (anterior, turned 20 degrees toward the patient's left and 15 degrees from
above), head up, so the patient's right is on the screen's left, as in the 2D views; the cube in the corner
names the sides.

Modes (:data:`MODES`):

- ``surfaces``: the air spaces inside the body (lungs and airways: below -400 HU, not connected to the air
  around the patient) on a grid of about :data:`DISPLAY_STEP_MM`, smoothed, translucent;
- ``volume``: ray-cast volume rendering of the same coarse grid (soft tissue faint, bone white).

A display aid only: the lung surface is not the lung mask predict uses. Screenshots: :meth:`VolumeView.grab_rgb`
(``QWidget.grab`` is black for a VTK widget).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import vtkmodules.qt

vtkmodules.qt.PyQtImpl = "PySide6"  # before QVTKRenderWindowInteractor is imported

from PySide6.QtCore import QTimer  # noqa: E402
from PySide6.QtWidgets import QVBoxLayout, QWidget  # noqa: E402
from scipy import ndimage  # noqa: E402
from vtkmodules.qt.QVTKRenderWindowInteractor import QVTKRenderWindowInteractor  # noqa: E402
from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy  # noqa: E402
from vtkmodules.vtkCommonCore import vtkPoints, vtkUnsignedCharArray  # noqa: E402
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData  # noqa: E402
from vtkmodules.vtkCommonExecutionModel import vtkAlgorithm  # noqa: E402
from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402
from vtkmodules.vtkCommonTransforms import vtkTransform  # noqa: E402
from vtkmodules.vtkFiltersCore import (  # noqa: E402
    vtkAppendPolyData,
    vtkFlyingEdges3D,
    vtkPolyDataNormals,
    vtkQuadricDecimation,
)
from vtkmodules.vtkFiltersGeneral import vtkTransformFilter  # noqa: E402
from vtkmodules.vtkFiltersSources import vtkOutlineSource  # noqa: E402
from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera  # noqa: E402
from vtkmodules.vtkInteractionWidgets import vtkOrientationMarkerWidget  # noqa: E402
from vtkmodules.vtkRenderingAnnotation import vtkAnnotatedCubeActor  # noqa: E402
from vtkmodules.vtkRenderingCore import (  # noqa: E402
    vtkActor,
    vtkColorTransferFunction,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkVolume,
    vtkVolumeProperty,
    vtkWindowToImageFilter,
)
from vtkmodules.vtkCommonDataModel import vtkPiecewiseFunction  # noqa: E402
from vtkmodules.vtkRenderingVolume import vtkFixedPointVolumeRayCastMapper  # noqa: E402
import vtkmodules.vtkRenderingOpenGL2  # noqa: E402,F401 - registers the OpenGL render window
import vtkmodules.vtkRenderingFreeType  # noqa: E402,F401 - text of the orientation cube
import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: E402,F401

from nodulenet.app.reslice import PatientAxes, nodule_colour  # noqa: E402
from nodulenet.io.findings import NoduleFinding  # noqa: E402
from nodulenet.io.volume import Geometry  # noqa: E402

MODES = ("surfaces", "volume")
DISPLAY_STEP_MM = 2.5
AIR_HU = -400.0
PLANE_COLOURS = {"axial": (0.3, 0.6, 1.0), "coronal": (0.3, 1.0, 0.4), "sagittal": (1.0, 0.5, 0.3)}


def index_to_world_matrix(geometry: Geometry, offset_zyx: Sequence[float] = (0.0, 0.0, 0.0),
                          step_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> vtkMatrix4x4:
    """4x4 matrix taking VTK image points (i, j, k) = (x, y, z) index of a sub-grid (first voxel at
    ``offset_zyx`` of the scan, every ``step_zyx`` voxels) to world LPS mm, through the scan geometry."""
    origin = geometry.voxel_to_world(np.asarray(offset_zyx, dtype=np.float64))
    columns = []
    for axis in (2, 1, 0):  # i, j, k = array x, y, z
        delta = np.zeros(3)
        delta[axis] = step_zyx[axis]
        columns.append(geometry.voxel_to_world(np.asarray(offset_zyx) + delta) - origin)
    m = vtkMatrix4x4()
    for row in range(3):
        for col in range(3):
            m.SetElement(row, col, float(columns[col][row]))
        m.SetElement(row, 3, float(origin[row]))
    return m


def _image_data(array_zyx: np.ndarray) -> vtkImageData:
    """A vtkImageData of unit spacing at the origin holding ``array_zyx`` (x fastest, as VTK stores it)."""
    image = vtkImageData()
    image.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    scalars = numpy_to_vtk(np.ascontiguousarray(array_zyx).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


@dataclass
class ChestModel:
    """What the 3D view shows of a scan, made once (in a worker thread): the lung surface in world mm, and the
    HU on the coarse display grid with its grid-to-world matrix (for volume rendering)."""

    lungs: vtkPolyData
    coarse_hu: vtkImageData
    coarse_to_world: vtkMatrix4x4


def chest_model(hu_zyx: np.ndarray, geometry: Geometry) -> ChestModel:
    """Coarse grid of about :data:`DISPLAY_STEP_MM`, the air inside the body on it, smoothed, contoured, moved to
    world coordinates. No rendering: safe in a worker thread."""
    steps = tuple(max(1, int(round(DISPLAY_STEP_MM / s))) for s in geometry.spacing_zyx)
    coarse = hu_zyx[::steps[0], ::steps[1], ::steps[2]]
    matrix = index_to_world_matrix(geometry, (0, 0, 0), steps)
    lungs = ndimage.gaussian_filter(air_inside_body(coarse).astype(np.float32), 0.8)
    contour = _contour(lungs, 0.5)  # keep a reference: a filter freed under its consumer's connection crashes
    surface = _surface_in_world(contour, matrix)
    return ChestModel(lungs=surface, coarse_hu=_image_data(np.clip(coarse, -1024, 3071).astype(np.int16)),
                      coarse_to_world=matrix)


def air_inside_body(hu_zyx: np.ndarray) -> np.ndarray:
    """Voxels below :data:`AIR_HU` that are not connected to the air around the patient (in-plane borders)."""
    air = hu_zyx < AIR_HU
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    border = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(),
                             labels[:, :, -1].ravel()])
    outside = np.unique(border[border > 0])
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    inside = np.ones(n + 1, dtype=bool)
    inside[0] = False
    inside[outside] = False
    # Specks (noise, small bowel gas) are not lungs: keep components of at least 2 % of the largest.
    if inside.any():
        inside &= sizes >= 0.02 * sizes[inside].max()
    return inside[labels]


def _surface_in_world(source: vtkAlgorithm, index_to_world: vtkMatrix4x4) -> vtkPolyData:
    """``source``'s surface with normals, moved by the 4x4 ``index_to_world`` matrix, as a standalone copy (the
    pipeline can be freed; the copy can cross from a worker thread to the render thread)."""
    normals = vtkPolyDataNormals()
    normals.SetInputConnection(source.GetOutputPort())
    transform = vtkTransform()
    transform.SetMatrix(index_to_world)
    to_world = vtkTransformFilter()
    to_world.SetTransform(transform)
    to_world.SetInputConnection(normals.GetOutputPort())
    to_world.Update()
    surface = vtkPolyData()
    surface.DeepCopy(to_world.GetOutput())
    return surface


def _contour(field: np.ndarray, level: float) -> vtkFlyingEdges3D:
    contour = vtkFlyingEdges3D()
    contour.SetInputData(_image_data(field))
    contour.SetValue(0, level)
    contour.Update()
    return contour


def nodule_meshes(findings: Sequence[NoduleFinding], geometry: Geometry) -> dict[int, vtkPolyData]:
    """One smoothed surface per finding with a mask, in world mm, its points coloured (``colour``, RGB) like the
    finding's 2D overlay. No rendering: safe to call in a worker thread (the viewer does, while loading results).
    """
    meshes: dict[int, vtkPolyData] = {}
    for f in findings:
        if f.mask is None or not f.mask.array.any():
            continue
        crop = np.pad(f.mask.array.astype(np.float32), 1)
        contour = _contour(ndimage.gaussian_filter(crop, 0.6), 0.45)
        if contour.GetOutput().GetNumberOfPoints() == 0:  # a few voxels smooth away: take them as they are
            contour = _contour(crop, 0.5)
        # The mask's voxel grid over-tessellates a smooth blob: keep a quarter of the triangles (a software
        # renderer draws about 0.6 M triangles a second; LIDC-IDRI-0001 at threshold 0.05 had 426 k of them).
        decimate = vtkQuadricDecimation()
        decimate.SetInputConnection(contour.GetOutputPort())
        decimate.SetTargetReduction(0.75)
        mesh = _surface_in_world(decimate, index_to_world_matrix(geometry, tuple(o - 1 for o in f.mask.offset_zyx)))
        rgb = np.tile(np.asarray(nodule_colour(f.id), dtype=np.uint8), (mesh.GetNumberOfPoints(), 1))
        colours = numpy_to_vtk(rgb, deep=True, array_type=vtkUnsignedCharArray().GetDataType())
        colours.SetName("colour")
        mesh.GetPointData().SetScalars(colours)
        meshes[f.id] = mesh
    return meshes


class VolumeView(QWidget):
    """The 3D view widget (a :class:`QVTKRenderWindowInteractor` inside a plain QWidget)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("volume_view")
        self.setMinimumSize(160, 160)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.vtk_widget = QVTKRenderWindowInteractor(self)
        layout.addWidget(self.vtk_widget)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.08, 0.08, 0.1)
        self.render_window = self.vtk_widget.GetRenderWindow()
        self.render_window.AddRenderer(self.renderer)
        self.interactor = self.render_window.GetInteractor()
        self.interactor.SetInteractorStyle(vtkInteractorStyleTrackballCamera())
        self._marker = self._orientation_marker()
        self.mode = "surfaces"
        self.geometry: Geometry | None = None
        self._model: ChestModel | None = None
        self._chest: list[object] = []
        self.plane_actors: dict[str, vtkActor] = {}
        self._plane_polys: dict[str, vtkPolyData] = {}
        # All nodules in ONE actor (a software renderer pays per actor: 346 actors took 0.6 s a frame, one 0.07 s).
        self._meshes: dict[int, vtkPolyData] = {}
        self.visible_nodule_ids: list[int] = []
        self._append = vtkAppendPolyData()
        nodule_mapper = vtkPolyDataMapper()
        nodule_mapper.SetInputConnection(self._append.GetOutputPort())
        nodule_mapper.SetScalarModeToUsePointData()
        nodule_mapper.SetColorModeToDirectScalars()
        self.nodule_actor = vtkActor()
        self.nodule_actor.SetMapper(nodule_mapper)
        self.nodule_actor.VisibilityOff()
        self.renderer.AddViewProp(self.nodule_actor)
        self._selection = vtkOutlineSource()
        selection_mapper = vtkPolyDataMapper()
        selection_mapper.SetInputConnection(self._selection.GetOutputPort())
        self.selection_actor = vtkActor()
        self.selection_actor.SetMapper(selection_mapper)
        self.selection_actor.GetProperty().SetColor(1.0, 1.0, 1.0)
        self.selection_actor.GetProperty().SetLineWidth(2.0)
        self.selection_actor.VisibilityOff()
        self.renderer.AddViewProp(self.selection_actor)
        # Renders are coalesced: scrolling through 50 slices asks for 50 plane moves but gets a few frames.
        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(30)
        self._render_timer.timeout.connect(self._render_now)
        self.vtk_widget.Initialize()

    def _orientation_marker(self) -> vtkOrientationMarkerWidget:
        cube = vtkAnnotatedCubeActor()
        # LPS: +x is the patient's Left, +y Posterior, +z Superior.
        cube.SetXPlusFaceText("L")
        cube.SetXMinusFaceText("R")
        cube.SetYPlusFaceText("P")
        cube.SetYMinusFaceText("A")
        cube.SetZPlusFaceText("S")
        cube.SetZMinusFaceText("I")
        cube.SetFaceTextScale(0.6)
        cube.GetCubeProperty().SetColor(0.25, 0.25, 0.3)
        marker = vtkOrientationMarkerWidget()
        marker.SetOrientationMarker(cube)
        marker.SetInteractor(self.interactor)
        marker.SetViewport(0.0, 0.0, 0.16, 0.16)
        marker.SetEnabled(1)
        marker.InteractiveOff()
        return marker

    # ------------------------------------------------------------------------------------------ content

    def set_volume(self, hu_zyx: np.ndarray | None, geometry: Geometry | None, chest: ChestModel | None = None) -> None:
        """Show a new scan (None clears): chest in the current mode, slice planes, camera from the front.
        ``chest`` (from :func:`chest_model`, made in a worker thread) saves the slow part; made here when None."""
        self.clear_findings()
        for actor in self._chest:
            self.renderer.RemoveViewProp(actor)
        for actor in self.plane_actors.values():
            self.renderer.RemoveViewProp(actor)
        self._chest, self.plane_actors = [], {}
        self.geometry = geometry
        if hu_zyx is None or geometry is None:
            self._model = None
            self.render()
            return
        self._model = chest if chest is not None else chest_model(hu_zyx, geometry)
        self._build_chest()
        for view in PLANE_COLOURS:
            self.plane_actors[view] = self._plane_actor(view)
            self.renderer.AddViewProp(self.plane_actors[view])
        self.reset_camera()

    def _build_chest(self) -> None:
        model = self._model
        assert model is not None
        if self.mode == "surfaces":
            mapper = vtkPolyDataMapper()
            mapper.SetInputData(model.lungs)
            mapper.ScalarVisibilityOff()
            actor = vtkActor()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(0.75, 0.8, 0.95)
            actor.GetProperty().SetOpacity(0.22)
            self._chest = [actor]
        else:
            volume = vtkVolume()
            mapper = vtkFixedPointVolumeRayCastMapper()
            mapper.SetInputData(model.coarse_hu)
            volume.SetMapper(mapper)
            volume.SetProperty(self._ct_volume_property())
            volume.SetUserMatrix(model.coarse_to_world)
            self._chest = [volume]
        for prop in self._chest:
            self.renderer.AddViewProp(prop)

    @staticmethod
    def _ct_volume_property() -> vtkVolumeProperty:
        """Chest CT: lung vessels a faint blue haze, soft tissue a faint red veil, bone opaque ivory."""
        colour = vtkColorTransferFunction()
        for hu, rgb in ((-1024, (0, 0, 0)), (-700, (0.5, 0.6, 0.8)), (-300, (0.7, 0.6, 0.6)),
                        (-50, (0.85, 0.5, 0.4)), (100, (0.9, 0.55, 0.45)), (250, (1.0, 0.9, 0.75)),
                        (1000, (1.0, 1.0, 0.95))):
            colour.AddRGBPoint(hu, *rgb)
        opacity = vtkPiecewiseFunction()
        # Opacity per sample of the 2.5 mm grid: soft tissue must stay nearly clear over 300 mm of body.
        for hu, alpha in ((-1024, 0.0), (-750, 0.0), (-600, 0.004), (-450, 0.0), (-100, 0.0), (20, 0.006),
                          (150, 0.01), (250, 0.25), (500, 0.8), (1500, 0.95)):
            opacity.AddPoint(hu, alpha)
        prop = vtkVolumeProperty()
        prop.SetColor(colour)
        prop.SetScalarOpacity(opacity)
        prop.SetInterpolationTypeToLinear()
        prop.ShadeOff()  # emission only: shading a 2.5 mm grid darkens more than it shows
        return prop

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"3D mode must be one of {MODES}, got {mode!r}")
        if mode == self.mode:
            return
        self.mode = mode
        if self._model is not None:
            for prop in self._chest:
                self.renderer.RemoveViewProp(prop)
            self._build_chest()
            self.render()

    def set_findings(self, findings: Sequence[NoduleFinding], meshes: dict[int, vtkPolyData] | None = None) -> None:
        """Show the findings' surfaces (``meshes`` from :func:`nodule_meshes`, computed here when None)."""
        self.clear_findings()
        if self.geometry is None:
            return
        self._meshes = dict(meshes) if meshes is not None else nodule_meshes(findings, self.geometry)
        self.set_visible_ids(self._meshes)

    @property
    def nodule_ids(self) -> list[int]:
        """Ids of the findings that have a surface (those with a mask)."""
        return sorted(self._meshes)

    def clear_findings(self) -> None:
        self._meshes = {}
        self.visible_nodule_ids = []
        self._append.RemoveAllInputs()
        self.nodule_actor.VisibilityOff()
        self.selection_actor.VisibilityOff()

    def set_visible_ids(self, ids: Iterable[int]) -> None:
        keep = set(ids)
        self.visible_nodule_ids = [i for i in sorted(self._meshes) if i in keep]
        self._append.RemoveAllInputs()
        for fid in self.visible_nodule_ids:
            self._append.AddInputData(self._meshes[fid])
        self.nodule_actor.SetVisibility(bool(self.visible_nodule_ids))
        self.render()

    def select(self, finding: NoduleFinding | None) -> None:
        """Box the selected finding in white and turn the camera to it, keeping the distance."""
        mesh = None if finding is None else self._meshes.get(finding.id)
        if mesh is not None:
            b = np.asarray(mesh.GetBounds()) + np.array([-2.0, 2.0, -2.0, 2.0, -2.0, 2.0])  # 2 mm around it
            self._selection.SetBounds(*b)
            self.selection_actor.VisibilityOn()
        else:
            self.selection_actor.VisibilityOff()
        if finding is not None:
            camera = self.renderer.GetActiveCamera()
            focal = np.asarray(camera.GetFocalPoint())
            shift = np.asarray(finding.center_world_xyz_mm) - focal
            camera.SetFocalPoint(*(focal + shift))
            camera.SetPosition(*(np.asarray(camera.GetPosition()) + shift))
            self.renderer.ResetCameraClippingRange()
        self.render()

    # ------------------------------------------------------------------------------------ slice planes

    def _plane_corners(self, view: str, index: float) -> np.ndarray:
        """World corners of the slice plane of ``view`` at array index ``index`` along its normal axis."""
        axes = PatientAxes.from_geometry(self.geometry)  # type: ignore[arg-type]
        normal = axes.normal_axis(view)
        shape = self.geometry.shape_zyx  # type: ignore[union-attr]
        others = [a for a in range(3) if a != normal]
        corners = []
        for u, v in ((0, 0), (1, 0), (1, 1), (0, 1)):
            p = [0.0, 0.0, 0.0]
            p[normal] = index
            p[others[0]] = -0.5 if u == 0 else shape[others[0]] - 0.5
            p[others[1]] = -0.5 if v == 0 else shape[others[1]] - 0.5
            corners.append(self.geometry.voxel_to_world(p))  # type: ignore[union-attr]
        return np.asarray(corners)

    def _plane_actor(self, view: str) -> vtkActor:
        poly = vtkPolyData()
        poly.SetPoints(vtkPoints())
        lines = vtkCellArray()
        lines.InsertNextCell(5, [0, 1, 2, 3, 0])
        poly.SetLines(lines)
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(poly)
        actor = vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*PLANE_COLOURS[view])
        actor.GetProperty().SetLineWidth(2.0)
        self._plane_polys[view] = poly
        return actor

    def set_cursor(self, zyx: Sequence[float]) -> None:
        """Move the three slice planes to the crosshair voxel ``zyx``."""
        if self.geometry is None:
            return
        axes = PatientAxes.from_geometry(self.geometry)
        for view in self.plane_actors:
            index = float(round(zyx[axes.normal_axis(view)]))
            corners = self._plane_corners(view, index)
            points = vtkPoints()
            points.SetData(numpy_to_vtk(corners.astype(np.float64), deep=True))
            self._plane_polys[view].SetPoints(points)
            self._plane_polys[view].Modified()
        self.render()

    # --------------------------------------------------------------------------------------- camera etc.

    def reset_camera(self) -> None:
        """Look at the whole scan from the front (anterior, -y), head up (+z): patient's right on the left."""
        if self.geometry is None:
            return
        shape = np.asarray(self.geometry.shape_zyx, dtype=np.float64)
        centre = self.geometry.voxel_to_world((shape - 1) / 2.0)
        extent = float(np.linalg.norm(shape * np.asarray(self.geometry.spacing_zyx)))
        camera = self.renderer.GetActiveCamera()
        camera.SetFocalPoint(*centre)
        camera.SetPosition(*(centre + np.array([0.0, -1.0, 0.0]) * extent * 1.6))
        camera.SetViewUp(0.0, 0.0, 1.0)
        camera.SetViewAngle(30.0)
        # A little from the patient's left and above: depth is visible, the right is still on the screen's left.
        camera.Azimuth(20.0)
        camera.Elevation(15.0)
        camera.OrthogonalizeViewUp()
        self.renderer.ResetCameraClippingRange()
        self.render()

    def render(self) -> None:
        """Ask for a frame (coalesced: several requests within 30 ms give one)."""
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _render_now(self) -> None:
        if self.isVisible():
            self.render_window.Render()

    def flush(self) -> None:
        """Draw a frame now if one was asked for (before a screenshot)."""
        if self._render_timer.isActive():
            self._render_timer.stop()
            self._render_now()

    def grab_rgb(self) -> np.ndarray:
        """The rendered 3D view as an ``(height, width, 3)`` uint8 array, top row first."""
        self.render_window.Render()
        grabber = vtkWindowToImageFilter()
        grabber.SetInput(self.render_window)
        grabber.ReadFrontBufferOff()
        grabber.Update()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
        return np.ascontiguousarray(pixels[::-1])

    def closeEvent(self, event: object) -> None:  # noqa: N802
        self.finalize()
        super().closeEvent(event)  # type: ignore[arg-type]

    def finalize(self) -> None:
        """Release the OpenGL context before the widget goes (else VTK warns or crashes at exit)."""
        self._render_timer.stop()
        self._marker.SetEnabled(0)
        self.vtk_widget.Finalize()
