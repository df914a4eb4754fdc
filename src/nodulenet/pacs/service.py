"""What ``nodulenet serve --dicom-port ...`` adds to the server: the listener and the result sender, started after the
workers and stopped before them (:func:`nodulenet.serve.server.run_server` calls the three methods below)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodulenet.io.atomic import write_json_atomic
from nodulenet.pacs.settings import DicomSettings
from nodulenet.serve.store import JobStore

logger = logging.getLogger("nodulenet.serve.dicom")


class DicomService:
    """The DICOM side of one server (see :mod:`nodulenet.pacs.listener` and :mod:`nodulenet.pacs.delivery`)."""

    def __init__(self, settings: DicomSettings, data_dir: Path, *, threshold: float, queue_size: int) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.threshold = threshold
        self.queue_size = queue_size
        self.listener: Any = None
        self.sender: Any = None

    def before_recover(self, store: JobStore) -> None:
        """Before the server's recovery removes job folders it does not know: take back half-queued series."""
        from nodulenet.pacs.listener import reclaim_unqueued_series

        reclaim_unqueued_series(self.data_dir, store, self.settings)

    def start(self, store: JobStore, say: Callable[[str], None]) -> None:
        from nodulenet.pacs.delivery import ResultSender
        from nodulenet.pacs.listener import DicomListener, SeriesAssembler

        assembler = SeriesAssembler(self.data_dir, store, self.settings, threshold=self.threshold,
                                    queue_size=self.queue_size)
        if self.settings.destination is not None:
            self.sender = ResultSender(self.data_dir, store, self.settings)
            self.sender.start()
        self.listener = DicomListener(assembler, self.settings)
        self.listener.start()
        s = self.settings
        write_json_atomic(s.state_path(self.data_dir), {"ae_title": s.ae_title, "host": s.host,
                                                        "port": self.listener.port})
        dest = f"; results to {s.destination}" if s.destination else "; results stay on the server (no --dicom-dest)"
        say(f"DICOM listener {s.ae_title} on {s.host}:{self.listener.port} (accepts {', '.join(s.allowed_aes)}; a "
            f"series is complete after {s.idle_s:g} s without new instances{dest})")

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.sender is not None:
            self.sender.stop()
        self.settings.state_path(self.data_dir).unlink(missing_ok=True)
