"""A DICOMweb client (``dicomweb-client`` over ``requests``): find a study's CT series (QIDO-RS), fetch it (WADO-RS),
store DICOM files (STOW-RS). Every failure is one :class:`DicomwebError` line naming the server and what failed:
unreachable, credentials refused, study or series not found, instances missing, instances the server refused.

Retries are off in the library (``set_http_retry_params(retry=False)``): a CLI run reports at once, and the server's
delivery (:mod:`nodulenet.pacs.delivery`) retries on its own schedule, recording every attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from nodulenet.errors import NoduleNetError
from nodulenet.pacs.auth import DicomwebAuth

logger = logging.getLogger(__name__)

TIMEOUT_S = 120.0
CT_MODALITY = "CT"


class DicomwebError(NoduleNetError):
    """A DICOMweb request failed (one line: the server, the request, the reason)."""


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study as QIDO-RS describes it."""

    series_uid: str
    modality: str
    n_instances: int | None
    description: str = ""
    number: int | None = None

    def summary(self) -> str:
        count = "?" if self.n_instances is None else str(self.n_instances)
        text = f"{self.modality or '?'} series {self.series_uid} ({count} instances"
        return text + (f", {self.description!r})" if self.description else ")")


def require_client_library() -> None:
    try:
        import dicomweb_client  # noqa: F401
        import requests  # noqa: F401
    except ImportError as exc:
        raise NoduleNetError(f"DICOMweb needs the pacs extra ({exc.name} is missing): "
                             "pip install 'nodulenet[pacs]'") from None


def _short_reason(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error ("Connection refused"), not its 300-character repr."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "Connection reset", "Remote end closed connection"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200] if text else type(exc).__name__


@contextmanager
def dicomweb_errors(url: str, what: str) -> Iterator[None]:
    """Turn ``requests`` errors of ``what`` (e.g. "searching study X") into one :class:`DicomwebError` line."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else "?"
        reason = (response.reason or "") if response is not None else ""
        if status in (401, 403):
            raise DicomwebError(f"DICOMweb server {url} refused the credentials (HTTP {status} {reason}) while "
                                f"{what}; give --dicomweb-auth basic:FILE or bearer:FILE") from None
        body = (response.text or "").strip().replace("\n", " ")[:200] if response is not None else ""
        raise DicomwebError(f"DICOMweb server {url}: {what} failed with HTTP {status} {reason}"
                            + (f": {body}" if body else "")) from None
    except requests.Timeout:
        raise DicomwebError(f"DICOMweb server {url} did not answer within {TIMEOUT_S:.0f} s while {what}") from None
    except requests.RequestException as exc:
        raise DicomwebError(f"cannot reach the DICOMweb server {url} ({_short_reason(exc)}) while {what}") from None


def connect(url: str, auth: DicomwebAuth | None = None, timeout_s: float = TIMEOUT_S) -> Any:
    """A ``DICOMwebClient`` for ``url`` (the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``)."""
    require_client_library()
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = (auth or DicomwebAuth()).apply(requests.Session())
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout_s)
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


def list_series(client: Any, url: str, study_uid: str) -> list[SeriesInfo]:
    """Every series of ``study_uid`` (QIDO-RS ``/studies/{uid}/series``); an error when the study is unknown."""
    fields = ["Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    with dicomweb_errors(url, f"searching the series of study {study_uid}"):
        found = client.search_for_series(study_instance_uid=study_uid, fields=fields, get_remaining=True)
    series = []
    for item in found:
        count = _value(item, "00201209")
        number = _value(item, "00200011")
        series.append(SeriesInfo(series_uid=str(_value(item, "0020000E") or ""),
                                 modality=str(_value(item, "00080060") or ""),
                                 n_instances=None if count is None else int(count),
                                 description=str(_value(item, "0008103E") or ""),
                                 number=None if number is None else int(number)))
    if not series:
        raise DicomwebError(f"DICOMweb server {url} has no study {study_uid} (QIDO-RS found no series)")
    return series


def choose_ct_series(series: Sequence[SeriesInfo], url: str, study_uid: str,
                     series_uid: str | None = None) -> SeriesInfo:
    """The series to predict: ``series_uid`` when given (it must be CT), else the CT series with most instances."""
    listed = "; ".join(s.summary() for s in series)
    if series_uid is not None:
        match = [s for s in series if s.series_uid == series_uid]
        if not match:
            raise DicomwebError(f"study {study_uid} on {url} has no series {series_uid}; it has: {listed}")
        if match[0].modality != CT_MODALITY:
            raise DicomwebError(f"series {series_uid} on {url} has modality {match[0].modality or 'unknown'}; "
                                "NoduleNet reads CT")
        return match[0]
    ct = [s for s in series if s.modality == CT_MODALITY]
    if not ct:
        raise DicomwebError(f"study {study_uid} on {url} has no CT series; it has: {listed}")
    chosen = max(ct, key=lambda s: s.n_instances or 0)
    if len(ct) > 1:
        logger.info("study %s has %d CT series; took the largest: %s", study_uid, len(ct), chosen.summary())
    return chosen


def _ensure_file_meta(ds: Dataset) -> Dataset:
    """WADO-RS parts are Part-10 files; make sure the meta a file needs is there before saving one."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def fetch_series(client: Any, url: str, study_uid: str, series: SeriesInfo, folder: Path,
                 on_instance: Callable[[int], None] | None = None) -> list[Path]:
    """WADO-RS retrieve of one series into ``folder/<SOPInstanceUID>.dcm``; checks every instance arrived."""
    from nodulenet.export.dicom_source import save_dataset

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with dicomweb_errors(url, f"retrieving series {series.series_uid}"):
        for ds in client.iter_series(study_uid, series.series_uid):
            sop = str(ds.get("SOPInstanceUID", ""))
            if not sop or "/" in sop or sop.startswith("."):
                raise DicomwebError(f"DICOMweb server {url} sent an instance without a usable SOPInstanceUID "
                                    f"({sop!r}) in series {series.series_uid}")
            paths.append(save_dataset(_ensure_file_meta(ds), folder / f"{sop}.dcm"))
            if on_instance is not None:
                on_instance(len(paths))
    if series.n_instances is not None and len(paths) != series.n_instances:
        raise DicomwebError(f"DICOMweb server {url} sent {len(paths)} of the {series.n_instances} instances of "
                            f"series {series.series_uid}")
    if not paths:
        raise DicomwebError(f"DICOMweb server {url} sent no instances of series {series.series_uid}")
    return paths


def store_files(client: Any, url: str, paths: Sequence[Path]) -> list[str]:
    """STOW-RS the DICOM files ``paths`` (one request per study); returns the SOP Instance UIDs stored.

    A 200/202 answer can still list refused instances (``FailedSOPSequence``): that is an error too, with the
    failure reasons the server gave.
    """
    if not paths:
        return []
    datasets = [pydicom.dcmread(p) for p in paths]
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    stored: list[str] = []
    for study_uid, group in by_study.items():
        names = ", ".join(Path(p).name for p in paths)
        with dicomweb_errors(url, f"storing {names} (STOW-RS) into study {study_uid}"):
            response = client.store_instances(group, study_instance_uid=study_uid)
        failed = list(getattr(response, "FailedSOPSequence", []) or [])
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
                                f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed)
            raise DicomwebError(f"DICOMweb server {url} refused {len(failed)} of {len(group)} instance(s): {reasons}")
        accepted = {str(item.ReferencedSOPInstanceUID) for item in getattr(response, "ReferencedSOPSequence", [])}
        for ds in group:
            uid = str(ds.SOPInstanceUID)
            if accepted and uid not in accepted:
                raise DicomwebError(f"DICOMweb server {url} did not confirm storing instance {uid}")
            stored.append(uid)
    return stored
