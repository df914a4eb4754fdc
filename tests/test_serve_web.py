"""The web viewer of ``nodulenet serve`` and the server's privacy.

In-process (FastAPI TestClient): only the login page and /health without the token, the viewer's code and every job
file behind it, no path out of the static folders, the vendored NiiVue matches its VERSION record. A real server
(subprocess): a token put in a URL's query string never reaches ``server.log``; the log, the job store and every job
file are 0600 and the folders 0700. In headless chromium (SwiftShader WebGL2): a wrong token gets the login form
again and no data; the right one logs in, uploads the small phantom, follows the job, lists its nodules; clicking one
moves the axial view to it, and the screenshot shows that finding's overlay colour at the nodule's projected position
(computed here from the NIfTI geometry, independently of NiiVue) and no overlay colour anywhere else in the view;
the score slider takes a finding out of the table and the picture.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _chromium import chromium, console_errors, missing, wait_until
from _serverproc import running_server

from nodulenet.preprocess.phantom import PhantomConfig, write_phantom
from nodulenet.serve.privacy import MaskSecrets, make_data_private, mask_secrets
from nodulenet.serve.settings import DISCLAIMER, ServerSettings

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")]

TOKEN = "web-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0))
SEED = 2
VENDOR = Path(__file__).resolve().parents[1] / "src" / "nodulenet" / "serve" / "static" / "app" / "vendor" / "niivue"
TCIA_CREDIT = "The Cancer Imaging Archive (TCIA), CC BY 3.0"


@pytest.fixture
def api(tmp_path: Path):
    from fastapi.testclient import TestClient

    from nodulenet.serve.app import create_app

    settings = ServerSettings(data_dir=tmp_path / "data", token=TOKEN, workers=0)
    with TestClient(create_app(settings)) as client:
        yield client


def test_only_the_login_page_without_the_token(api) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # the notice and the credit are on the page before anyone logs in
    assert DISCLAIMER.split(":")[0] in page.text and TCIA_CREDIT in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for asset in ("/static/login.js", "/static/style.css"):
        assert api.get(asset).status_code == 200, asset
    viewer = ("/app/viewer.js", "/app/vendor/niivue/niivue.umd.js", "/app/vendor/niivue/LICENSE")
    job = "0" * 32
    for path in (*viewer, f"/v1/jobs/{job}/volume", f"/v1/jobs/{job}/mask", "/v1/jobs"):
        for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}):
            assert api.get(path, headers=headers).status_code == 401, (path, headers)
        # a token in the query string is not a token
        assert api.get(f"{path}?token={TOKEN}").status_code == 401, path
    for path in viewer:
        r = api.get(path, headers=AUTH)
        assert r.status_code == 200 and len(r.content) > 100, path
        assert r.headers["cache-control"].startswith("private"), path
    assert api.get(f"/v1/jobs/{job}/volume", headers=AUTH).status_code == 404


@pytest.mark.parametrize("path", ["/static/%2e%2e/app/viewer.js", "/static/..%2Fapp%2Fviewer.js",
                                  "/static/%2e%2e/%2e%2e/web.py", "/static/nothing.js", "/static/"])
def test_the_public_folder_gives_nothing_else(api, path: str) -> None:
    r = api.get(path)  # no token: the viewer's code and the package's files stay out of reach
    assert r.status_code == 404, (path, r.status_code, r.text[:200])


@pytest.mark.parametrize("path", ["/app/%2e%2e/public/index.html", "/app/%2e%2e/%2e%2e/web.py", "/app/vendor",
                                  "/app/..%2F..%2Fsettings.py", "/app/%2Fetc%2Fpasswd", "/app/nothing.js"])
def test_the_app_folder_gives_nothing_else(api, path: str) -> None:
    r = api.get(path, headers=AUTH)
    assert r.status_code == 404, (path, r.status_code, r.text[:200])


def test_vendored_niivue_is_what_its_version_file_says() -> None:
    record = dict(line.split("=", 1) for line in (VENDOR / "VERSION").read_text().split())
    bundle = (VENDOR / "niivue.umd.js").read_bytes()
    assert record["package"] == "@niivue/niivue" and record["version"].count(".") == 2
    assert hashlib.sha256(bundle).hexdigest() == record["sha256"] and len(bundle) == int(record["bytes"])
    assert len(bundle) < 4_000_000  # the repository stays lean: one minified file
    assert "BSD 2-Clause" in (VENDOR / "LICENSE").read_text()
    assert "==== fflate" in (VENDOR / "THIRD-PARTY-LICENSES").read_text()


def test_secrets_are_masked_in_log_lines() -> None:
    line = '127.0.0.1:5000 - "GET /v1/jobs?limit=5&token=s3cr3t-Value_1&x=1 HTTP/1.1" 401'
    assert mask_secrets(line) == '127.0.0.1:5000 - "GET /v1/jobs?limit=5&token=***&x=1 HTTP/1.1" 401'
    assert mask_secrets("/app/x.js?access_token=abc") == "/app/x.js?access_token=***"
    assert mask_secrets("Authorization: Bearer abc.def-123") == "Authorization: Bearer ***"
    assert mask_secrets("GET /v1/jobs?state=done") == "GET /v1/jobs?state=done"
    # the access log's record: the path is an argument, formatted only when written
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/?token=s3cr3t", "1.1", 200), None)
    assert MaskSecrets().filter(record) and record.getMessage() == '127.0.0.1:1 - "GET /?token=*** HTTP/1.1" 200'


def test_data_folder_is_made_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "jobs").mkdir(parents=True)
    for name in ("server.log", "jobs.sqlite3"):
        (data / name).write_text("x")
        os.chmod(data / name, 0o644)
    os.chmod(data, 0o755)
    old = os.umask(0o022)
    try:
        make_data_private(data)
        assert os.umask(0o022) == 0o077  # what the server and its workers create from now on
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700 and stat.S_IMODE((data / "jobs").stat().st_mode) == 0o700
    assert all(stat.S_IMODE((data / n).stat().st_mode) == 0o600 for n in ("server.log", "jobs.sqlite3"))


def _private_everywhere(data_dir: Path) -> list[str]:
    """Paths under ``data_dir`` that another user could read: files not 0600, folders not 0700."""
    wrong = []
    for path in [data_dir, *data_dir.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if (path.is_dir() and mode != 0o700) or (path.is_file() and mode != 0o600):
            wrong.append(f"{path.relative_to(data_dir)} {mode:04o}")
    return wrong


def test_token_in_a_url_never_reaches_server_log(tmp_path: Path) -> None:
    nifti = gzip.compress((348).to_bytes(4, "little") + b"\0" * 344 + b"n+1\0" + b"\0" * 4)
    with running_server(tmp_path / "data", token=TOKEN, workers=0) as server:
        secret = server.token
        for path in (f"/?token={secret}", f"/v1/info?token={secret}", f"/v1/jobs?limit=1&access_token={secret}",
                     f"/app/viewer.js?token={secret}"):
            httpx.get(server.url + path, headers=server.headers(), timeout=10)
            httpx.get(server.url + path, timeout=10)  # refused (401) lines are logged too
        r = httpx.post(f"{server.url}/v1/jobs?token={secret}", headers=server.headers(),
                       files={"file": ("scan.nii.gz", nifti)}, timeout=30)
        assert r.status_code == 201, r.text
        time.sleep(0.5)  # the access log line is written after the response
        log = server.log.read_text()
        assert "/v1/info?token=*** HTTP/1.1" in log and "/?token=*** HTTP/1.1" in log  # the lines are there, masked
        assert secret not in log and secret not in server.output.read_text()
        assert _private_everywhere(server.data_dir) == []  # log, store (+ -wal/-shm), token, job folder, upload


# ------------------------------------------------------------------------------------------------ in the browser


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of an (..., 3) uint8 array."""
    r, g, b = (rgb[..., i].astype(float) / 255 for i in range(3))
    mx, mn = np.max(rgb, -1) / 255, np.min(rgb, -1) / 255
    d = np.where(mx > mn, mx - mn, 1)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    return h


def _of_colour(pixels: np.ndarray, colour: list[int], tolerance_deg: float = 12.0) -> np.ndarray:
    """Pixels showing ``colour`` blended over grey (the overlay over the scan): clearly coloured, same hue."""
    chroma = pixels.max(-1).astype(int) - pixels.min(-1)
    target = colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0] * 360
    delta = np.abs((_hue(pixels) - target + 180) % 360 - 180)
    return (chroma >= 40) & (delta <= tolerance_deg)


def _axial_projection(geometry: dict[str, Any], tile: list[float], point_lps: np.ndarray) -> np.ndarray:
    """Where an LPS point lies in the axial tile (canvas pixels), from the scan's geometry alone: the axial plane's
    field of view (voxel corners) fitted into the tile and centred, radiological convention (patient right on the
    left, anterior up). Phantom scans are axis-aligned (identity direction)."""
    origin, spacing, size = (np.asarray(geometry[k], float) for k in ("origin", "spacing", "size"))
    low = origin[:2] - spacing[:2] / 2  # LPS x (right -> left) and y (anterior -> posterior) of the first corner
    fov = spacing[:2] * size[:2]
    left, top, width, height = tile
    scale = min(width / fov[0], height / fov[1])
    pad = (np.array([width, height]) - fov * scale) / 2
    return np.array([left, top]) + pad + (np.asarray(point_lps[:2], float) - low) * scale


def _geometry(nifti_bytes: bytes, tmp: Path) -> dict[str, Any]:
    import SimpleITK as sitk

    path = tmp / "volume.nii.gz"
    path.write_bytes(nifti_bytes)
    image = sitk.ReadImage(str(path))
    assert np.allclose(image.GetDirection(), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return {"origin": image.GetOrigin(), "spacing": image.GetSpacing(), "size": image.GetSize(),
            "array": sitk.GetArrayFromImage(image)}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("web_scan"), SEED, SMALL, fmt="nii.gz")["scan"]


def test_browser_login_upload_job_table_click_and_overlay_pixels(phantom: Path, tmp_path: Path) -> None:
    why = missing()
    if why:
        pytest.skip(why)
    from PIL import Image
    from selenium.webdriver.common.by import By

    with running_server(tmp_path / "data", token=TOKEN, workers=1) as server, chromium(1400, 900) as driver:
        driver.get(server.url + "/")
        # a wrong token: the login form again, with the reason, and nothing of the server's data
        driver.find_element(By.ID, "token").send_keys("wrong-token-0123456789")
        driver.find_element(By.ID, "login-button").click()
        wait_until(driver, "return document.getElementById('login-error').textContent", 20, "the login error")
        assert driver.find_element(By.ID, "login").is_displayed()
        assert not driver.find_element(By.ID, "app").is_displayed()
        assert driver.execute_script("return sessionStorage.getItem('nodulenet-token')") is None
        assert driver.execute_script("return typeof window.NoduleNetViewer") == "undefined"  # its code never came
        assert driver.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr") == []
        assert all("/v1/info" in e and "401" in e for e in console_errors(driver))  # the refused attempt only

        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login-button").click()
        wait_until(driver, "return document.body.dataset.viewer === 'ready'", 30, "the viewer after login")
        assert driver.find_element(By.ID, "app").is_displayed() and not driver.find_element(By.ID, "login").is_displayed()
        assert TCIA_CREDIT in driver.find_element(By.ID, "credit").text
        assert "not a medical device" in driver.find_element(By.ID, "notice").text

        driver.find_element(By.ID, "scan-file").send_keys(str(phantom))
        driver.find_element(By.ID, "upload-button").click()
        stages = set()
        deadline = time.monotonic() + 180
        while not driver.execute_script("return window.NoduleNetViewer.state().loaded"):
            stages.add(driver.find_element(By.ID, "upload-stage").text)
            assert time.monotonic() < deadline, f"the job did not open; stages seen: {stages}"
            time.sleep(0.2)
        assert any(s.startswith(("queued", "reading", "predicting", "exporting", "uploading", "starting"))
                   for s in stages), stages  # progress was shown while it ran

        job_id = driver.execute_script("return window.NoduleNetViewer.state().job")
        nodules = httpx.get(f"{server.url}/v1/jobs/{job_id}/nodules", headers=server.headers()).json()
        threshold = nodules["threshold"]
        expected = sorted((f for f in nodules["findings"] if f["score"] >= threshold), key=lambda f: -f["score"])
        assert len(expected) >= 1
        rows = driver.find_elements(By.CSS_SELECTOR, "#nodule-table tbody tr")
        assert [int(r.get_attribute("data-id")) for r in rows] == [f["id"] for f in expected]
        first_cells = rows[0].find_elements(By.TAG_NAME, "td")
        assert first_cells[2].text == f"{expected[0]['score']:.2f}"
        assert first_cells[3].text == f"{expected[0]['diameter_mm']:.1f}"

        # click the LAST finding (the page opened on the first): the views must move to it
        target = expected[-1]
        rows[-1].click()
        wait_until(driver, f"return window.NoduleNetViewer.state().selected === {target['id']}", 10, "the selection")
        time.sleep(0.5)  # one frame
        state = driver.execute_script("return window.NoduleNetViewer.state()")
        shot = tmp_path / "viewer.png"
        shot.write_bytes(driver.find_element(By.ID, "gl").screenshot_as_png)
        driver.save_screenshot(str(tmp_path / "page.png"))

        # downloads go through fetch() with the token: the file saved is the server's
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.find_element(By.CSS_SELECTOR, "#downloads button[data-file='nodules.json']").click()
        deadline = time.monotonic() + 20
        while not (downloads / "nodules.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)
        assert json.loads((downloads / "nodules.json").read_text()) == nodules

        # the score slider above the lowest shown score: that finding leaves the table and the picture
        cut = round(min(f["score"] for f in expected) + 0.005, 2)
        if cut <= 1.0:
            driver.execute_script(f"const s = document.getElementById('score-slider'); s.value = '{cut}';"
                                  "s.dispatchEvent(new Event('input')); return 1")
            time.sleep(0.5)
            left = [int(r.get_attribute("data-id")) for r in
                    driver.find_elements(By.CSS_SELECTOR, "#nodule-table tbody tr")]
            assert left == [f["id"] for f in expected if f["score"] >= cut], (cut, left)
            hidden_shot = driver.find_element(By.ID, "gl").screenshot_as_png

        volume = httpx.get(f"{server.url}/v1/jobs/{job_id}/volume", headers=server.headers(), timeout=30)
        mask = httpx.get(f"{server.url}/v1/jobs/{job_id}/mask", headers=server.headers(), timeout=30)
        assert volume.status_code == 200 and mask.status_code == 200
        geometry = _geometry(volume.content, tmp_path)
        labels = _geometry(mask.content, tmp_path)
        assert geometry["size"] == labels["size"] and np.allclose(geometry["origin"], labels["origin"], atol=1e-3)
        assert console_errors(driver) == []
        wrong = _private_everywhere(server.data_dir)  # results, viewer copy, SEG-less outputs: all private
        assert wrong == [], wrong

    # the crosshair went to the finding's centre (NiiVue works in RAS: -x, -y, z of LPS)
    centre = np.asarray(target["center_world_xyz_mm"], float)
    np.testing.assert_allclose(state["crosshair_mm"], [-centre[0], -centre[1], centre[2]], atol=1.5)
    tile = next(t for t in state["tiles"] if t["view"] == "axial")["ltwh"]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[1] >= tile[0] + tile[2] - 1 and pixels.shape[0] >= tile[1] + tile[3] - 1
    # Independent projection vs NiiVue's own view of the axial plane (its left-top corner in RAS mm)
    at = _axial_projection(geometry, tile, centre)
    corner = _axial_projection(geometry, tile, np.array([-state["tiles"][0]["left_top_mm"][0], 0.0]))
    scale = tile[2] / (geometry["spacing"][0] * geometry["size"][0])
    assert abs(corner[0] - tile[0]) <= 1.0 + scale, (corner, tile)  # both put the scan's right edge at the left

    l, t, w, h = (round(v) for v in tile)
    axial = pixels[t:t + h, l:l + w]
    yy, xx = np.mgrid[t:t + h, l:l + w]
    colours = {int(k): v for k, v in state["colours"].items()}
    mine = _of_colour(axial, colours[target["id"]])
    # (1) the overlay's colour at the nodule's projected position: most of a disk half the nodule's radius
    radius_px = 0.25 * target["diameter_mm"] * scale
    disk = (xx - at[0]) ** 2 + (yy - at[1]) ** 2 <= radius_px ** 2
    assert disk.sum() >= 10 and mine[disk].mean() >= 0.8, (at, radius_px, mine[disk].mean())

    # (2) and nowhere else: every pixel of any finding's colour lies inside the projected box (+3 px) of a finding
    # whose z range holds this slice
    z_index = (centre[2] - geometry["origin"][2]) / geometry["spacing"][2]
    allowed = np.zeros_like(mine)
    for f in expected:
        z0, y0, x0, z1, y1, x1 = f["box_zyx"]
        if not z0 - 0.5 <= z_index <= z1 + 0.5:
            continue
        sx, sy = geometry["spacing"][:2]
        ox, oy = geometry["origin"][:2]
        lo = _axial_projection(geometry, tile, np.array([ox + (x0 - 0.5) * sx, oy + (y0 - 0.5) * sy]))
        hi = _axial_projection(geometry, tile, np.array([ox + (x1 - 0.5) * sx, oy + (y1 - 0.5) * sy]))
        allowed |= (xx >= lo[0] - 3) & (xx <= hi[0] + 3) & (yy >= lo[1] - 3) & (yy <= hi[1] + 3)
    for fid, colour in colours.items():
        stray = _of_colour(axial, colour) & ~allowed
        assert stray.sum() == 0, (fid, int(stray.sum()), np.argwhere(stray)[:5].tolist())
    assert (mine & allowed).sum() >= disk.sum()

    if cut <= 1.0:  # the hidden finding's colour is gone from the axial view
        import io

        hidden = np.asarray(Image.open(io.BytesIO(hidden_shot)).convert("RGB"))[t:t + h, l:l + w]
        for f in expected:
            if f["score"] < cut:
                assert _of_colour(hidden, colours[f["id"]]).sum() == 0, f["id"]


def test_volume_before_the_job_is_done_is_409(api) -> None:
    """The viewer's copy of the scan is a result like the others: 409 with the state before the job is done."""
    nifti = gzip.compress((348).to_bytes(4, "little") + b"\0" * 344 + b"n+1\0" + b"\0" * 4)
    job = api.post("/v1/jobs", headers=AUTH, files={"file": ("scan.nii.gz", nifti)}).json()["id"]
    r = api.get(f"/v1/jobs/{job}/volume", headers=AUTH)
    assert r.status_code == 409 and "queued" in r.json()["detail"]
