"""Screenshots of the web viewer for docs/viewer.md: a real ``nodulenet serve`` (one worker, shipped model), headless
chromium (tests/_chromium.py), the demo phantom uploaded as NIfTI and, when the test data is there, LIDC-IDRI-0001
uploaded as a zipped DICOM series; each job opened, the table set to score >= ``--min-score``, one finding clicked.

    .venv/bin/python scripts/web_viewer_screenshots.py docs/images [--min-score 0.9]

Writes ``web_viewer_phantom.png`` and ``web_viewer_lidc.png`` (1600 x 1000).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from _chromium import chromium, missing, wait_until  # noqa: E402
from _serverproc import running_server  # noqa: E402


def lidc_zip(root: Path) -> Path | None:
    data = Path(os.environ.get("NODULENET_TEST_DATA", REPO.parent / "shared" / "data"))
    found = sorted((data / "LIDC-IDRI" / "LIDC-IDRI-0001").glob("*/*/*.xml"))
    if not found:
        return None
    archive = root / "LIDC-IDRI-0001.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for f in sorted(found[0].parent.glob("*.dcm")):
            z.write(f, f"LIDC-IDRI-0001/{f.name}")
    return archive


def shoot(driver, scan: Path, out: Path, min_score: float, pick: int) -> None:
    from selenium.webdriver.common.by import By

    before = driver.execute_script("return window.NoduleNetViewer.state().job || ''")
    driver.find_element(By.ID, "scan-file").clear()
    driver.find_element(By.ID, "scan-file").send_keys(str(scan))
    driver.find_element(By.ID, "upload-button").click()
    wait_until(driver, f"const s = window.NoduleNetViewer.state(); return s.loaded && s.job !== '{before}'", 1800,
               f"the job of {scan.name}")
    driver.execute_script(f"const s = document.getElementById('score-slider'); s.value = '{min_score}';"
                          "s.dispatchEvent(new Event('input')); return 1")
    rows = driver.find_elements(By.CSS_SELECTOR, "#nodule-table tbody tr")
    if rows:
        rows[min(pick, len(rows) - 1)].click()
    time.sleep(1.5)
    driver.save_screenshot(str(out))
    print(f"wrote {out} ({len(rows)} finding(s) at score >= {min_score})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--min-score", type=float, default=0.9)
    args = parser.parse_args()
    why = missing()
    if why:
        sys.exit(f"cannot run the browser: {why}")
    from selenium.webdriver.common.by import By

    from nodulenet.preprocess.phantom import write_phantom

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nodulenet-webshots-") as tmp:
        root = Path(tmp)
        phantom = write_phantom(root / "phantom", 0)["scan"]  # `nodulenet demo`'s scan
        lidc = lidc_zip(root)
        with running_server(root / "data", workers=1, timeout_s=600) as server, chromium(1600, 1000) as driver:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "token").send_keys(server.token)
            driver.find_element(By.ID, "login-button").click()
            wait_until(driver, "return document.body.dataset.viewer === 'ready'", 60, "the viewer")
            shoot(driver, phantom, args.out_dir / "web_viewer_phantom.png", args.min_score, 0)
            if lidc is not None:
                shoot(driver, lidc, args.out_dir / "web_viewer_lidc.png", args.min_score, 0)
            else:
                print("LIDC-IDRI-0001 not found (NODULENET_TEST_DATA): only the phantom")


if __name__ == "__main__":
    main()
