"""How fast the viewer opens a scan and its results, draws a 2D frame and a 3D frame (needs a display).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/viewer_render.py [--scan PATH] [--quick]

The scan is LIDC-IDRI-0001 from ``$NODULENET_TEST_DATA/LIDC-IDRI`` (512 x 512 x 133) when present, else the demo
phantom (288 x 288 x 82); results come from one ``predict_scans`` run with the shipped model (threshold 0.5).

Figures, all in the real :class:`MainWindow` at 1500 x 920 (views about 440 x 400 px):

- ``open_s``: open_scan to scan_loaded (read + 3D chest model, in a thread); ``open_max_pause_s``: the longest
  time the GUI event loop did not run meanwhile (a 20 ms timer measures it: the window never freezes for longer);
- ``results_s``: load_results to results_loaded (nodules.json, label map, one 3D mesh per finding, in a thread);
- ``frame_ms``: one 2D view repainted (QPainter: window/level, outlines, boxes, text), per view, slice changing
  every frame so no cache helps; mean and 95th percentile; ``..._scroll_all_views``: the view grid repainted
  after a scroll step (the other views move their crosshair; the 3D frame is drawn later, coalesced);
- ``vtk_2d_frame_ms``: the same slice change drawn by VTK (vtkImageSliceMapper + window/level) in a render window
  of the same size: the alternative the QPainter view was chosen over;
- ``select_ms``: select_finding (all views to a nodule); ``render3d_ms``: a 3D frame in each mode.
On this build machine the GPU is Mesa llvmpipe (software): 3D figures are far lower on a real GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402


def _lidc_series() -> Path | None:
    root = Path(os.environ.get("NODULENET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    found = sorted((root / "LIDC-IDRI" / "LIDC-IDRI-0001").glob("*/*/*.xml"))
    return found[0].parent if found else None


def _wait(predicate, timeout_s: float) -> None:
    from nodulenet.app.screenshots import wait_for

    wait_for(predicate, timeout_s, "the viewer")


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 2), "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 2)}


def _vtk_2d_frame_ms(volume, width: int, height: int, n: int) -> float:
    """VTK's way: the volume as vtkImageData, an image slice mapper moved slice by slice, window/level."""
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkRenderingCore import vtkImageSlice, vtkImageSliceMapper, vtkRenderer, vtkRenderWindow

    image = vtkImageData()
    z, y, x = volume.shape_zyx
    image.SetDimensions(x, y, z)
    image.SetSpacing(*volume.geometry.spacing_xyz)
    image.GetPointData().SetScalars(numpy_to_vtk(volume.array.ravel(), deep=True))
    mapper = vtkImageSliceMapper()
    mapper.SetInputData(image)
    mapper.SetOrientationToZ()
    actor = vtkImageSlice()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColorWindow(1500)
    actor.GetProperty().SetColorLevel(-600)
    renderer = vtkRenderer()
    renderer.AddViewProp(actor)
    window = vtkRenderWindow()
    window.SetSize(width, height)
    window.AddRenderer(renderer)
    renderer.ResetCamera()
    window.Render()
    times = []
    for k in range(n):
        mapper.SetSliceNumber((k * 7) % z)
        t0 = time.perf_counter()
        window.Render()
        times.append((time.perf_counter() - t0) * 1000)
    window.Finalize()
    return round(statistics.fmean(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scan", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY"):
        sys.exit("needs a display: run under xvfb-run (see the docstring)")
    from PySide6.QtCore import QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from nodulenet.app.main_window import MainWindow
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, predict_scans

    app = QApplication.instance() or QApplication(["viewer-benchmark"])
    n_frames = 10 if args.quick else 40
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        scan = args.scan or _lidc_series()
        if scan is None:
            from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

            scan = Path(write_phantom(tmp / "phantom", 0, PhantomConfig())["scan"])
        figures["scan"] = str(scan)
        t0 = time.perf_counter()
        run = predict_scans([scan], tmp / "predict", PredictOptions(threshold=0.5, dicom_outputs=False),
                            shard=Shard(rank=0, world_size=1, local_rank=0))
        figures["predict_s"] = round(time.perf_counter() - t0, 1)
        result = run.results[0]
        figures["findings"] = result.n_findings

        window = MainWindow(settings=QSettings(str(tmp / "s.ini"), QSettings.Format.IniFormat),
                            results_root=tmp / "results")
        window.resize(1500, 920)
        window.show()
        app.processEvents()
        ticks: list[float] = []
        timer = QTimer()
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        opened: list[bool] = []
        window.scan_loaded.connect(lambda: opened.append(True))
        timer.start(20)
        t0 = time.perf_counter()
        window.open_scan(scan)
        _wait(lambda: bool(opened), 300)
        figures["open_s"] = round(time.perf_counter() - t0, 2)
        timer.stop()
        stamps = [t0, *ticks, time.perf_counter()]
        figures["open_max_pause_s"] = round(max(b - a for a, b in zip(stamps, stamps[1:])), 3)
        figures["shape_zyx"] = list(window.volume.shape_zyx)

        loaded: list[bool] = []
        window.results_loaded.connect(lambda: loaded.append(True))
        t0 = time.perf_counter()
        window.load_results(result.out_dir)
        _wait(lambda: bool(loaded), 300)
        figures["results_s"] = round(time.perf_counter() - t0, 2)

        frames: dict = {}
        for style in ("outline", "fill"):
            for view in window.views.values():
                view.set_overlay_style(mask_style=style)
            for name, view in window.views.items():
                n = view.axes.slice_count(name)
                times, scroll = [], []
                for k in range(n_frames):
                    view.blockSignals(True)  # this view alone: the others do not follow
                    view.set_slice_index((k * 7) % n)
                    view.blockSignals(False)
                    t0 = time.perf_counter()
                    view.repaint()
                    times.append((time.perf_counter() - t0) * 1000)
                    # As when the user scrolls: the other two views redraw their crosshair too.
                    view.set_slice_index((k * 7 + 3) % n)
                    t0 = time.perf_counter()
                    window.grid.repaint()
                    scroll.append((time.perf_counter() - t0) * 1000)
                frames[f"{name}_{style}"] = _stats(times)
                frames[f"{name}_{style}_scroll_all_views"] = _stats(scroll)
        figures["frame_ms"] = frames
        axial = window.views["axial"]
        figures["view_px"] = [axial.width(), axial.height()]
        figures["vtk_2d_frame_ms"] = _vtk_2d_frame_ms(window.volume, axial.width(), axial.height(), n_frames)

        findings = window.results.findings.findings[:10]
        times = []
        for f in findings:
            t0 = time.perf_counter()
            window.select_finding(f.id)
            app.processEvents()
            times.append((time.perf_counter() - t0) * 1000)
        figures["select_ms"] = _stats(times) if times else None
        render3d = {}
        for mode in ("surfaces", "volume"):
            window.volume_view.set_mode(mode)
            window.volume_view.render_window.Render()
            times = []
            for _ in range(3 if args.quick else 6):
                t0 = time.perf_counter()
                window.volume_view.render_window.Render()
                times.append((time.perf_counter() - t0) * 1000)
            render3d[mode] = round(statistics.fmean(times), 1)
        figures["render3d_ms"] = render3d
        window.close()
    # This machine is shared: the load says how much of the 2 cores the viewer had.
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    for key, value in figures.items():
        print(f"{key:<18} {value}")
    record("viewer_render", figures)


if __name__ == "__main__":
    main()
