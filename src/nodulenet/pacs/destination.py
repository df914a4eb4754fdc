"""Send result files to a :class:`~nodulenet.pacs.settings.Destination`: C-STORE (pynetdicom SCU) or STOW-RS.

:func:`send_files` raises :class:`~nodulenet.errors.NoduleNetError` with one line naming the destination and the
reason (connection refused, association rejected, a C-STORE status, HTTP status, refused instances).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom

from nodulenet.errors import NoduleNetError
from nodulenet.pacs.auth import DicomwebAuth
from nodulenet.pacs.settings import Destination

logger = logging.getLogger(__name__)

TIMEOUT_S = 30.0
# Result files are sent SEG before SR: the SR references the SEG, and a PACS may check that what it references is
# there. (Keys of ``ScanResult.details["files"]`` / the kinds in ``job_result.json``.)
SEND_ORDER = ("dicom_seg", "dicom_sr")
# pynetdicom's codes for why an association was rejected (PS3.8 9.3.4), in words.
_REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context not supported",
    (1, 3): "our calling AE title is not recognised", (1, 7): "the called AE title is not recognised",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


class DeliveryError(NoduleNetError):
    """Sending results to their destination failed (one line)."""


def c_store_files(paths: Sequence[Path], *, calling_ae: str, called_ae: str, host: str, port: int,
                  timeout_s: float = TIMEOUT_S) -> list[str]:
    """C-STORE each file to ``called_ae@host:port`` in one association; returns the SOP Instance UIDs stored."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    where = f"{called_ae}@{host}:{port}"
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        syntaxes = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == sop_class}
        ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            rej = assoc.acceptor.primitive
            result = getattr(rej, "result_source", None), getattr(rej, "diagnostic", None)
            why = _REJECT_REASONS.get(result, f"source {result[0]}, reason {result[1]}")
            raise DeliveryError(f"{where} rejected the association from {calling_ae} ({why}); is {calling_ae} "
                                f"configured there as a DICOM node at this machine's address?")
        raise DeliveryError(f"cannot open a DICOM association with {where} (connection refused or timed out "
                            f"after {timeout_s:.0f} s); is the DICOM node running?")
    stored: list[str] = []
    try:
        for path, ds in zip(paths, datasets):
            status = assoc.send_c_store(ds)
            if not status:
                raise DeliveryError(f"{where}: no answer to the C-STORE of {Path(path).name} (connection lost or "
                                    f"timed out after {timeout_s:.0f} s)")
            code = int(status.Status)
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or warnings (stored with coercion)
                comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
                raise DeliveryError(f"{where} refused {Path(path).name}: C-STORE status 0x{code:04X}{comment}")
            stored.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae: str,
               auth: DicomwebAuth | None = None) -> list[str]:
    """Send ``paths`` (SEG first, then SR) to ``destination``; returns the SOP Instance UIDs it took."""
    if not paths:
        return []
    try:
        if destination.kind == "dimse":
            return c_store_files(paths, calling_ae=calling_ae, called_ae=destination.ae_title,
                                 host=destination.host, port=destination.port)
        from nodulenet.pacs.dicomweb import connect, store_files

        return store_files(connect(destination.url, auth), destination.url, paths)
    except NoduleNetError:
        raise
    except (OSError, ValueError) as exc:  # a result file that vanished or does not parse, a socket error
        raise DeliveryError(f"sending {', '.join(Path(p).name for p in paths)} to {destination} failed: "
                            f"{type(exc).__name__}: {exc}") from None
