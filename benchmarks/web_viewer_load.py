"""How long the web viewer takes to open a full-size scan with its overlay in the browser.

A real ``nodulenet serve`` (subprocess, one worker, shipped model) gets a 512 x 512 x 140 phantom (0.7 mm pixels,
1.25 mm slices; as a NIfTI, or with ``--dicom`` as a zipped DICOM series, which the server converts to NIfTI for the
browser on first view); once the job is done, headless chromium (SwiftShader WebGL2, no GPU: a real GPU is faster)
logs in and opens the job. Figures:

- ``volume_first_s`` / ``volume_cached_s``: GET /v1/jobs/{id}/volume the first time (the viewer's copy of the scan is
  made: read the input, write .nii.gz) and once it exists (just the transfer), from Python on the same machine;
- ``open_s`` (mean of ``--repeat`` opens): click on the job row -> the scan and the label map drawn with the table
  filled; ``page_ms``: the page's own split of it: ``download_ms`` (nodules.json, the scan, the label map),
  ``decode_ms`` (gunzip + NIfTI parse by NiiVue), ``display_ms`` (GPU upload, the label layer resampled onto the
  scan grid with outlines, the 3D render's textures, the first frame);
- ``jump_ms``: a click on a finding -> the views at it (mean over the findings);
- the sizes of the two files and of the scan.

    .venv/bin/python benchmarks/web_viewer_load.py [--dicom] [--repeat 1]

Recorded in ``benchmarks/results/web_viewer_load.json`` (``web_viewer_load_dicom.json`` with ``--dicom``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _chromium import chromium, missing, wait_until  # noqa: E402
from _record import record  # noqa: E402
from _serverproc import running_server  # noqa: E402

SHAPE_YX = (512, 512)
SLICES = 140


def make_scan(root: Path, dicom: bool) -> tuple[Path, tuple[int, int, int]]:
    from nodulenet.preprocess.phantom import PhantomConfig, make_phantom, write_phantom

    config = PhantomConfig(shape_yx=SHAPE_YX, spacing_yx_mm=(0.7, 0.7), extent_z_mm=SLICES * 1.25,
                           slice_thickness_range_mm=(1.25, 1.25), n_nodules=4, diameter_range_mm=(6.0, 20.0))
    if not dicom:
        scan = write_phantom(root / "nifti", 7, config, fmt="nii.gz")["scan"]
        from nodulenet.io.image_files import read_image

        return scan, read_image(scan).geometry.shape_zyx
    from test_serve_server import write_dicom_series

    volume = make_phantom(7, config).image
    series = root / "dicom" / "PH-7"
    write_dicom_series(volume, series, 7)
    archive = root / "scan.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(series.iterdir()):
            z.write(f, f"PH-7/{f.name}")
    return archive, volume.geometry.shape_zyx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dicom", action="store_true", help="upload a zipped DICOM series instead of a NIfTI")
    parser.add_argument("--repeat", type=int, default=1, help="opens of the job to average")
    args = parser.parse_args()
    why = missing()
    if why:
        sys.exit(f"cannot run the browser: {why}")
    import httpx
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory(prefix="nodulenet-webbench-") as tmp:
        root = Path(tmp)
        scan, shape = make_scan(root, args.dicom)
        upload_bytes = scan.stat().st_size
        print(f"scan {scan.name}: {shape[2]} x {shape[1]} x {shape[0]} voxels, {scan.stat().st_size / 1e6:.1f} MB")
        with running_server(root / "data", workers=1, args=["--max-upload-mb", "2000"], timeout_s=600) as server:
            client = server.client()
            t0 = time.perf_counter()
            job = client.submit(scan, threshold=0.5)
            done = client.wait(job["id"], poll_s=0.5, timeout_s=1800)
            job_s = time.perf_counter() - t0
            print(f"job done in {job_s:.1f} s: {done['n_findings']} finding(s)")
            url = f"{server.url}/v1/jobs/{job['id']}"
            timings = {}
            for name in ("volume_first_s", "volume_cached_s"):
                t = time.perf_counter()
                volume = httpx.get(f"{url}/volume", headers=server.headers(), timeout=600).raise_for_status()
                timings[name] = round(time.perf_counter() - t, 3)
            mask = httpx.get(f"{url}/mask", headers=server.headers(), timeout=600).raise_for_status()

            opens, niivue, jumps = [], [], []
            with chromium(1600, 1000) as driver:
                driver.get(server.url + "/")
                driver.find_element(By.ID, "token").send_keys(server.token)
                driver.find_element(By.ID, "login-button").click()
                wait_until(driver, "return document.body.dataset.viewer === 'ready'", 60, "the viewer")
                for _ in range(args.repeat):
                    driver.execute_script("window.NoduleNetViewer.stop(); return 1")
                    driver.execute_script("document.body.dataset.viewer = 'ready'; return 1")
                    driver.find_element(By.ID, "refresh-jobs").click()
                    wait_until(driver, "return document.querySelector('#jobs-table tbody tr')", 30, "the job list")
                    row = driver.find_element(By.CSS_SELECTOR, "#jobs-table tbody tr")
                    t = time.perf_counter()
                    row.click()
                    wait_until(driver, "return window.NoduleNetViewer.state().loaded", 600, "the scan in the viewer")
                    opens.append(time.perf_counter() - t)
                    page = driver.execute_script("return window.NoduleNetViewer.state().timings")
                    niivue.append(page)
                rows = driver.find_elements(By.CSS_SELECTOR, "#nodule-table tbody tr")
                for r in rows:
                    fid = int(r.get_attribute("data-id"))
                    t = time.perf_counter()
                    r.click()
                    wait_until(driver, f"return window.NoduleNetViewer.state().selected === {fid}", 30, "the jump")
                    driver.execute_script("return 1")  # one round trip: the frame is drawn
                    jumps.append((time.perf_counter() - t) * 1000)

    figures = {
        "scan_shape_xyz": [shape[2], shape[1], shape[0]], "input": "dicom-zip" if args.dicom else "nifti",
        "upload_bytes": upload_bytes,
        "volume_bytes": len(volume.content), "label_map_bytes": len(mask.content), "job_s": round(job_s, 1),
        **timings, "open_s": round(statistics.fmean(opens), 2), "open_s_each": [round(v, 2) for v in opens],
        "page_ms": {k: round(statistics.fmean(p[k] for p in niivue)) for k in niivue[0]}, "jump_ms": round(statistics.fmean(jumps)) if jumps else None,
        "findings": len(jumps), "browser": "headless chromium, SwiftShader WebGL2 (no GPU)",
    }
    for k, v in figures.items():
        print(f"{k:>18}: {v}")
    path = record("web_viewer_load_dicom" if args.dicom else "web_viewer_load", figures)
    print(f"recorded in {path}")


if __name__ == "__main__":
    main()
