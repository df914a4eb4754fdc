"""A guard against a reference-count bug of PySide6 6.12.0 on CPython 3.11 (measured on the build machine).

Every call of a Qt method that returns nothing (``QPainter.setPen``, ``QWidget.update``, ``QObject.setObjectName``,
...) takes one reference from ``None`` and never gives it back: ``sys.getrefcount(None)`` drops by exactly 1 per
call. From Python 3.12 ``None`` is immortal (PEP 683) and this is harmless; on 3.11 its count reaches zero after
some thousands of such calls - a few seconds of scrolling, each frame makes dozens - and the interpreter aborts
with ``Fatal Python error: none_dealloc`` (a 10-line QWidget script that calls ``repaint()`` 3000 times is enough).

:func:`guard_none_refcount` measures the leak once (200 calls of a void method) and, only where it is there,
adds 2**40 to ``None``'s reference count: at 100,000 leaked references a second that lasts over 100 days. Nothing
is done on Python >= 3.12, on a PySide6 without the bug, or on a debug build of Python (other object layout).
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

TOP_UP = 1 << 40
_PROBE_CALLS = 200
_guarded = False


def none_references_lost_per_call() -> float:
    """How many references to None one call of a void Qt method loses (0 on a correct PySide6)."""
    from PySide6.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(_PROBE_CALLS):
        probe.setObjectName("nodulenet-refcount-probe")
    return (before - sys.getrefcount(None)) / _PROBE_CALLS


def guard_none_refcount() -> bool:
    """Apply the guard if this PySide6 leaks references to None (see the module doc); True when applied.
    Safe to call many times: the measurement and the top-up happen once per process."""
    global _guarded
    if _guarded:
        return True
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
        return False
    lost = none_references_lost_per_call()
    if lost < 0.5:
        return False
    refcount = ctypes.c_ssize_t.from_address(id(None))  # ob_refcnt: the first field of a CPython object
    before = sys.getrefcount(None)
    refcount.value += TOP_UP
    if sys.getrefcount(None) - before != TOP_UP:  # not the layout we expect: undo, change nothing
        refcount.value -= TOP_UP
        return False
    _guarded = True
    import PySide6

    logger.warning("PySide6 %s loses %.0f reference(s) to None per void call on Python %s; None's count raised by "
                   "2**40 so the viewer does not abort (nodulenet.app.qt_compat)", PySide6.__version__, lost,
                   sys.version.split()[0])
    return True
