"""A private X server (Xvfb) and one QApplication for the viewer tests.

``Xvfb -displayfd`` picks a free display number itself (no race with other test runs on the machine), with
``-screen 0 1600x1000x24 -nolisten tcp``. DISPLAY and ``QT_QPA_PLATFORM=xcb`` are set for this process and its
children (offscreen Qt with an embedded VTK widget does not work, see ENVIRONMENT-NOTES.md).

One Xvfb and one QApplication per test process (Qt allows one application per process, and several test
modules use it): :func:`qt_application` starts them on first use. Windows are closed by the tests' fixtures;
the application goes with the process as in any PySide program. A test module of the viewer imports the
module-scoped fixture ``app`` for that application by its function name (``from _xvfb import qt_app_fixture``),
so that the tests' ``app`` parameters do not shadow the import. Xvfb is stopped by the kernel the moment the
test process ends, however it ends (``PR_SET_PDEATHSIG``), and never before: killing it while Qt or VTK still
holds an X connection makes Xlib end the process with status 1, and pytest's exit status would be lost. Tests skip with the reason when Xvfb, PySide6 or VTK
is missing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

XVFB_SCREEN = "1600x1000x24"
_STATE: dict[str, Any] = {}


def require_gui_stack() -> None:
    """Skip unless Xvfb, PySide6 and VTK are all here."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb not installed (apt-get install xvfb xauth; .ci/run installs it)")
    pytest.importorskip("PySide6.QtWidgets", reason="PySide6 missing: pip install 'nodulenet[app]'")
    pytest.importorskip("vtkmodules", reason="VTK missing: pip install 'nodulenet[app]'")


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: stop Xvfb if the test process is killed


def start_xvfb() -> tuple[subprocess.Popen, str]:
    """Start Xvfb on a free display; returns (process, ":N")."""
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", XVFB_SCREEN, "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()  # Xvfb writes its display number once it accepts connections
    if not number:
        err = process.stderr.read().decode(errors="replace")[-500:] if process.stderr else ""
        process.kill()
        process.wait(5)
        pytest.skip(f"Xvfb did not start: {err.strip()}")
    return process, f":{number}"


def stop_xvfb(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def qt_application() -> Any:
    """The QApplication of this test process, on a private Xvfb (started on first use)."""
    require_gui_stack()
    if "app" in _STATE:
        return _STATE["app"]
    process, display = start_xvfb()
    _STATE["xvfb"] = process
    _STATE["saved_env"] = {k: os.environ.get(k) for k in ("DISPLAY", "QT_QPA_PLATFORM")}
    os.environ["DISPLAY"] = display
    os.environ["QT_QPA_PLATFORM"] = "xcb"
    from PySide6.QtWidgets import QApplication

    _STATE["app"] = QApplication.instance() or QApplication(["nodulenet-viewer-tests"])
    from nodulenet.app.qt_compat import guard_none_refcount

    guard_none_refcount()  # the tests call Qt's void methods too: same PySide6 bug, same guard as the viewer
    return _STATE["app"]


@pytest.fixture(scope="module", name="app")
def qt_app_fixture() -> Any:
    """The QApplication (:func:`qt_application`) for the tests of a module that imports this fixture."""
    return qt_application()


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Run the Qt event loop until ``predicate()`` holds; fail the test after ``timeout_s`` saying ``what``
    (the viewer's own :func:`~nodulenet.app.screenshots.wait_for`, its timeout as a test failure)."""
    from nodulenet.app.screenshots import WaitTimeout, wait_for

    try:
        wait_for(predicate, timeout_s, what)
    except WaitTimeout as exc:
        pytest.fail(str(exc))
