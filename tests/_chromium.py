"""Headless Debian chromium driven by selenium, for the web viewer's tests and benchmark: :func:`chromium`.

    with chromium(width=1400, height=900) as driver:
        driver.get(url)

WebGL2 runs on SwiftShader (``--enable-unsafe-swiftshader``: there is no GPU on the build machines); the profile is
a fresh temp folder; background networking, component updates and sync are off, so the browser talks to nobody but
the page's server. :func:`missing` says why the browser cannot run here (the test skips with it), or None.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--force-device-scale-factor=1", "--mute-audio")


def missing() -> str | None:
    """Why the browser tests cannot run on this machine, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} not found: apt-get install chromium chromium-driver (.ci/run installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install 'nodulenet[test]'"
    return None


@contextmanager
def chromium(width: int = 1400, height: int = 900, command_timeout_s: float = 900.0) -> Iterator[Any]:
    """A headless chromium (selenium WebDriver) with a window of ``width`` x ``height`` CSS pixels; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nodulenet-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    # A full-size scan keeps the page busy for minutes on software WebGL (SwiftShader): a script or a click waits
    # for it instead of failing after selenium's default 30 s / 120 s.
    driver.set_script_timeout(command_timeout_s)
    driver.command_executor._client_config.timeout = command_timeout_s
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    """The page's console messages at level SEVERE (JavaScript errors, failed requests)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def wait_until(driver: Any, script: str, timeout_s: float, what: str) -> Any:
    """Run ``script`` (JavaScript returning a value) until it is truthy; its value. TimeoutError naming ``what``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f} s (page says: "
                               f"{driver.execute_script('return document.body.innerText')[:600]!r})")
        time.sleep(0.2)
