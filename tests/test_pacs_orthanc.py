"""NoduleNet against a REAL Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started by the fixture on loopback
ports; see tests/_orthanc.py), with the demo phantom written as a DICOM CT series.

Pull: ``nodulenet predict --dicomweb URL --study UID --store-results`` (HTTP basic auth from a file) finds the CT
series by QIDO-RS, fetches it by WADO-RS, predicts and STOWs ``seg.dcm`` + ``sr.dcm`` into the same study. The SEG
is fetched back from Orthanc and decoded with highdicom over the CT's SOP instances: it holds exactly the voxels of
the local ``labels.nii.gz``.

Push: Orthanc C-STOREs the series (REST ``/modalities/nodulenet/store``) to ``nodulenet serve --dicom-port``; the
listener queues a job once the series is idle, a worker predicts it and SEG + SR are C-STOREd back into Orthanc.
Bad input: an unknown calling AE title (refused at association), a non-CT series and a series with a missing slice
(failed jobs whose error says why, instances kept), a STOW refused (HTTP 401) and Orthanc down (the job is done,
its delivery error is in the job record and the log, and the results arrive once the destination takes them).
After each, the listener still answers C-ECHO. Slow-marked (~40 s: two server starts and a prediction): a job
received by a server without workers survives its restart, runs while the destination Orthanc is down, and its
SEG + SR reach that Orthanc once it is started.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _orthanc import (
    PASSWORD,
    USER,
    OrthancProcess,
    free_port,
    orthanc_missing,
    running_orthanc,
    write_config,
)
from _serverproc import running_server

pytest.importorskip("pynetdicom")
pytest.importorskip("dicomweb_client")
hd = pytest.importorskip("highdicom")
if orthanc_missing():
    pytest.skip(orthanc_missing(), allow_module_level=True)

LISTENER_AE = "NODULENET"


# ---------------------------------------------------------------------------------------------- fixtures


def _series_record(paths: dict) -> dict:
    """What the tests need of a phantom written as a DICOM series (files and UIDs in array z order)."""
    files = sorted(paths["scan"].glob("*.dcm"))  # 0001.dcm ... in array z order
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return {"folder": paths["scan"], "files": files, "sop_uids": [str(h.SOPInstanceUID) for h in headers],
            "study_uid": str(headers[0].StudyInstanceUID), "series_uid": str(headers[0].SeriesInstanceUID),
            "frame_uid": str(headers[0].FrameOfReferenceUID),
            "truth": json.loads(paths["nodules"].read_text())["nodules"]}


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo phantom (seed 0, default config: what ``nodulenet demo`` predicts) as a DICOM series."""
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    return _series_record(write_phantom(tmp_path_factory.mktemp("phantom-dicom"), 0, PhantomConfig(), fmt="dicom"))


@pytest.fixture(scope="module")
def small_phantom_series(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smaller phantom (160 x 160 x 40, two nodules the demo model finds) for the restart test: half the time."""
    from nodulenet.preprocess.phantom import PhantomConfig, write_phantom

    config = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                           slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0))
    return _series_record(write_phantom(tmp_path_factory.mktemp("small-phantom-dicom"), 1, config, fmt="dicom"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, phantom_series: dict):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        server.upload(phantom_series["files"])
        yield server


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "orthanc.credentials"
    path.write_text(f"{USER}:{PASSWORD}\n")
    os.chmod(path, 0o600)
    return path


def _label_volume_from_seg(seg_bytes: bytes, ct_sop_uids: list[str], tmp: Path) -> np.ndarray:
    """Decode a SEG (highdicom) onto the CT grid: one label per voxel = segment number, z in the CT's order."""
    path = tmp / "from-orthanc-seg.dcm"
    path.write_bytes(seg_bytes)
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=ct_sop_uids, combine_segments=True,
                                             relabel=False)


def _series_by_modality(orthanc: OrthancProcess, study_uid: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for series in orthanc.find_series(study_uid):
        found.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return found


def _check_seg_sr(orthanc: OrthancProcess, phantom: dict, labels: np.ndarray, tmp: Path, seg: dict, sr: dict) -> None:
    """SEG + SR stored in Orthanc reference the CT and hold exactly ``labels``."""
    seg_bytes = orthanc.instance_file(seg["Instances"][0])
    seg_ds = pydicom.dcmread(io.BytesIO(seg_bytes))
    assert seg_ds.StudyInstanceUID == phantom["study_uid"]
    assert seg_ds.FrameOfReferenceUID == phantom["frame_uid"]
    assert seg_ds.SeriesInstanceUID not in (phantom["series_uid"],)
    referenced = {str(r.ReferencedSOPInstanceUID) for s in seg_ds.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert referenced <= set(phantom["sop_uids"]) and referenced
    decoded = _label_volume_from_seg(seg_bytes, phantom["sop_uids"], tmp)
    assert decoded.shape == labels.shape
    assert np.array_equal(decoded, labels), f"{int((decoded != labels).sum())} voxels differ"
    n_findings = int(labels.max())
    assert n_findings >= 3  # the demo model finds the phantom's nodules

    sr_path = tmp / "from-orthanc-sr.dcm"
    sr_path.write_bytes(orthanc.instance_file(sr["Instances"][0]))
    report = hd.sr.srread(sr_path)
    assert report.StudyInstanceUID == phantom["study_uid"]
    assert report.SeriesInstanceUID not in (phantom["series_uid"], seg_ds.SeriesInstanceUID)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == n_findings
    evidence = {str(i.ReferencedSOPInstanceUID) for s in report.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert str(seg_ds.SOPInstanceUID) in evidence and referenced <= evidence


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ------------------------------------------------------------------------------------------ pull: DICOMweb


@pytest.fixture(scope="module")
def pulled(orthanc: OrthancProcess, phantom_series: dict, credentials: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict:
    from typer.testing import CliRunner

    from nodulenet.cli import app

    out = tmp_path_factory.mktemp("dicomweb-out")
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ["predict", "--dicomweb", orthanc.dicomweb_url, "--study",
                                      phantom_series["study_uid"], "-o", str(out), "--store-results",
                                      "--dicomweb-auth", f"basic:{credentials}", "--threads", "1"])
    return {"out": out, "result": result, "seconds": time.perf_counter() - t0}


def test_predict_dicomweb_stores_seg_and_sr_into_the_study(pulled: dict, orthanc: OrthancProcess,
                                                          phantom_series: dict, tmp_path: Path) -> None:
    result = pulled["result"]
    assert result.exit_code == 0, result.output
    case = pulled["out"] / f"PHANTOM-00000_{phantom_series['series_uid'][-8:]}"
    assert (case / "seg.dcm").is_file() and (case / "sr.dcm").is_file()
    assert not list(pulled["out"].glob(".dicomweb-*")), "the fetched series is removed after predict"
    record = json.loads((case / "dicomweb.json").read_text())
    assert record["series_instance_uid"] == phantom_series["series_uid"] and record["n_instances"] == 82
    assert set(record["stored"]) == {"seg.dcm", "sr.dcm"} and "basic" in record["auth"]
    series = _series_by_modality(orthanc, phantom_series["study_uid"])
    assert len(series["CT"]) == 1 and len(series["CT"][0]["Instances"]) == 82
    (seg,) = [s for s in series["SEG"] if s["Instances"]
              and orthanc.rest("GET", f"/instances/{s['Instances'][0]}/simplified-tags")["SOPInstanceUID"]
              == record["stored"]["seg.dcm"]]
    (sr,) = [s for s in series["SR"] if orthanc.rest("GET", f"/instances/{s['Instances'][0]}/simplified-tags")
             ["SOPInstanceUID"] == record["stored"]["sr.dcm"]]
    _check_seg_sr(orthanc, phantom_series, _read_labels(case / "labels.nii.gz"), tmp_path, seg, sr)


def test_results_pass_dciodvfy(pulled: dict, phantom_series: dict) -> None:
    """dciodvfy (Debian dicom3tools) finds no error and no warning in the SEG, the SR or the written CT slice."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    case = pulled["out"] / f"PHANTOM-00000_{phantom_series['series_uid'][-8:]}"
    for path, iod in ((case / "seg.dcm", "Segmentation"), (case / "sr.dcm", "Comprehensive3DSR"),
                      (phantom_series["files"][0], "CTImage")):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert lines[0] == iod
        assert not [line for line in lines if line.startswith(("Error", "Warning"))], "\n".join(lines)


@pytest.mark.parametrize("case", ["wrong password", "unknown study", "not CT", "server down"])
def test_predict_dicomweb_bad_input_is_one_line(case: str, orthanc: OrthancProcess, phantom_series: dict,
                                                 pulled: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nodulenet.cli import app

    args = ["--dicomweb", orthanc.dicomweb_url, "--study", phantom_series["study_uid"]]
    auth = tmp_path / "auth"
    auth.write_text(f"{USER}:{PASSWORD}\n")
    os.chmod(auth, 0o600)
    expected = {"wrong password": "refused the credentials (HTTP 401",
                "unknown study": "has no study 1.2.3.999",
                "not CT": "has modality SEG; NoduleNet reads CT",
                "server down": "cannot reach the DICOMweb server"}[case]
    if case == "wrong password":
        auth.write_text(f"{USER}:wrong\n")
    elif case == "unknown study":
        args[3] = "1.2.3.999"
    elif case == "not CT":
        seg_series = _series_by_modality(orthanc, phantom_series["study_uid"])["SEG"][0]
        args += ["--series", seg_series["MainDicomTags"]["SeriesInstanceUID"]]
    else:
        args[1] = f"http://127.0.0.1:{free_port()}/dicom-web"
    from nodulenet.errors import NoduleNetError

    result = CliRunner().invoke(app, ["predict", *args, "-o", str(tmp_path / "out"), "--dicomweb-auth",
                                      f"basic:{auth}"])
    assert isinstance(result.exception, NoduleNetError), result.output
    output = str(result.exception)
    assert "\n" not in output
    assert expected in output and "Traceback" not in output


# --------------------------------------------------------------------------------------- push: C-STORE


def _echo(port: int, calling_ae: str = "ORTHANC") -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def _wait_job(server, predicate, timeout_s: float = 180.0) -> dict:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = httpx.get(f"{server.url}/v1/jobs", headers=server.headers(), timeout=30).json()["jobs"]
        for job in jobs:
            if predicate(job):
                return job
        time.sleep(0.2)
    raise AssertionError(f"no job matched within {timeout_s:.0f} s:\n{server.tail()}")


@pytest.fixture(scope="module")
def listener(orthanc: OrthancProcess, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    orthanc.add_modality("nodulenet", LISTENER_AE, port)
    args = ["--dicom-port", str(port), "--ae-title", LISTENER_AE, "--dicom-allow-ae", "ORTHANC",
            "--dicom-idle-s", "1", "--dicom-dest", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    with running_server(tmp_path_factory.mktemp("serve") / "data", workers=1, args=args) as server:
        server.dicom_port = port  # type: ignore[attr-defined]
        yield server


def test_orthanc_pushes_the_series_and_gets_seg_and_sr_back(listener, orthanc: OrthancProcess,
                                                          phantom_series: dict, tmp_path: Path) -> None:
    import httpx

    assert orthanc.rest("POST", "/modalities/nodulenet/echo", json={}) == {}
    before = {s["ID"] for s in orthanc.find_series(phantom_series["study_uid"])}
    ct_id = _series_by_modality(orthanc, phantom_series["study_uid"])["CT"][0]["ID"]
    orthanc.rest("POST", "/modalities/nodulenet/store", json={"Resources": [ct_id], "Synchronous": True})
    job = _wait_job(listener, lambda j: j["input"]["kind"] == "dicom-store" and j["state"] in ("done", "failed")
                    and "sent" in j["stage"] and phantom_series["series_uid"] in j["input"]["name"])
    assert job["state"] == "done" and job["error"] is None, job
    assert job["stage"] == f"done; seg.dcm + sr.dcm sent to ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    assert job["options"]["dicom"]["n_instances"] == 82 and job["options"]["dicom"]["calling_ae"] == "ORTHANC"
    new = [s for s in orthanc.find_series(phantom_series["study_uid"]) if s["ID"] not in before]
    by_modality = {s["MainDicomTags"]["Modality"]: s for s in new}
    assert set(by_modality) == {"SEG", "SR"}, new
    mask = httpx.get(f"{listener.url}/v1/jobs/{job['id']}/mask", headers=listener.headers(), timeout=60)
    (tmp_path / "labels.nii.gz").write_bytes(mask.content)
    _check_seg_sr(orthanc, phantom_series, _read_labels(tmp_path / "labels.nii.gz"), tmp_path,
                  by_modality["SEG"], by_modality["SR"])
    log = listener.log.read_text()
    assert f"job {job['id']}: seg.dcm + sr.dcm sent to ORTHANC@127.0.0.1:{orthanc.dicom_port}" in log


def test_unknown_calling_ae_is_refused_and_the_listener_stays_up(listener) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.dicom_port, ae_title=LISTENER_AE)
    assert assoc.is_rejected and not assoc.is_established
    assert assoc.acceptor.primitive.diagnostic == 3  # "calling AE title not recognised"
    assert "association from STRANGER (127.0.0.1:" in listener.log.read_text()
    assert "refused: calling AE title not in --dicom-allow-ae (ORTHANC)" in listener.log.read_text()
    assert _echo(listener.dicom_port)


def _small_series(folder: Path, *, modality: str = "CT", drop: int | None = None) -> list[Path]:
    from nodulenet.io.dicom_write import SeriesIdentity, write_ct_series
    from nodulenet.io.volume import Geometry, Volume

    volume = Volume.from_geometry(np.full((12, 32, 32), -800, np.int16),
                                  Geometry((12, 32, 32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0)), {})
    paths = write_ct_series(volume, folder, SeriesIdentity(patient_id="BAD-INPUT"))
    if modality != "CT":
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.Modality = modality
            ds.save_as(path, enforce_file_format=True)
    if drop is not None:
        paths[drop].unlink()
        paths = [p for i, p in enumerate(paths) if i != drop]
    return paths


@pytest.mark.parametrize("case", ["non-CT series", "missing slice"])
def test_bad_series_fail_with_the_reason_and_keep_their_instances(case: str, listener, tmp_path: Path) -> None:
    from nodulenet.pacs.destination import c_store_files

    paths = _small_series(tmp_path / "series", modality="MR" if case == "non-CT series" else "CT",
                          drop=5 if case == "missing slice" else None)
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    stored = c_store_files(paths, calling_ae="ORTHANC", called_ae=LISTENER_AE, host="127.0.0.1",
                           port=listener.dicom_port)
    assert len(stored) == len(paths)
    job = _wait_job(listener, lambda j: series_uid in j["input"]["name"] and j["state"] in ("done", "failed"))
    assert job["state"] == "failed"
    # The reader's words: "no CT image series ... found: <uid> (MR, ...)" / "missing slice(s): a gap of 4 mm ..."
    expected = ("no CT image series", "(MR,") if case == "non-CT series" else ("missing slice(s)", "gap of 4.000 mm")
    assert all(e in job["error"] for e in expected), job["error"]
    kept = listener.data_dir / "jobs" / job["id"] / "input" / series_uid
    assert len(list(kept.glob("*.dcm"))) == len(paths)  # nothing lost: the instances stay with the job
    assert f"job {job['id']}: failed" in listener.log.read_text()
    assert _echo(listener.dicom_port)


@pytest.mark.parametrize("case", ["STOW refused", "Orthanc down"])
def test_failed_sending_is_recorded_on_the_job_and_retried(case: str, orthanc: OrthancProcess, pulled: dict,
                                                          phantom_series: dict, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The sender in-process with the real Orthanc: a STOW-RS that Orthanc refuses (HTTP 401), or a C-STORE to an
    Orthanc that is down, leaves the job done with the error in its record and the log, the delivery pending and the
    files in place; the next try, once the destination takes them, sends them."""
    import shutil

    from nodulenet.pacs.delivery import ResultSender
    from nodulenet.pacs.settings import DicomSettings
    from nodulenet.serve.store import JobStore, NewJob

    case_dir = pulled["out"] / f"PHANTOM-00000_{phantom_series['series_uid'][-8:]}"
    data = tmp_path / "data"
    store = JobStore(data / "jobs.sqlite3")
    job_id = "a" * 32
    scan_dir = data / "jobs" / job_id / "result" / "scan"
    scan_dir.mkdir(parents=True)
    for name in ("seg.dcm", "sr.dcm"):
        shutil.copy(case_dir / name, scan_dir / name)
    store.create(NewJob(id=job_id, input_kind="dicom-store", input_name="x", input_bytes=0, scan_path="input/x",
                        options={}), 10)
    store.claim(1, 1.0)
    files = [{"name": "sr.dcm", "kind": "dicom_sr"}, {"name": "seg.dcm", "kind": "dicom_seg"}]
    store.finish(job_id, 1, "done", result={"scan_dir": "scan", "files": files, "scan_result": {}})
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    for path, password in ((wrong, "not-the-password"), (right, PASSWORD)):
        path.write_text(f"{USER}:{password}\n")
        os.chmod(path, 0o600)
    if case == "STOW refused":
        first = {"destination": orthanc.dicomweb_url, "destination_auth": f"basic:{wrong}"}
        then = {"destination": orthanc.dicomweb_url, "destination_auth": f"basic:{right}"}
        where, reason = orthanc.dicomweb_url, "refused the credentials (HTTP 401"
    else:
        down = free_port()
        orthanc.add_modality("nodulenet-sender", LISTENER_AE, free_port())  # Orthanc takes C-STOREs from it
        first = {"destination": f"ORTHANC@127.0.0.1:{down}", "destination_auth": None}
        then = {"destination": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "destination_auth": None}
        where, reason = first["destination"], f"cannot open a DICOM association with ORTHANC@127.0.0.1:{down}"

    def sender(destination: str, destination_auth: str | None) -> ResultSender:
        settings = DicomSettings.from_flags(port=0, allowed_aes=["ORTHANC"], ae_title=LISTENER_AE, host="127.0.0.1",
                                            idle_s=1, destination=destination, destination_auth=destination_auth,
                                            retry_s=1)
        return ResultSender(data, store, settings)

    caplog.set_level("INFO", logger="nodulenet.serve.dicom")
    failing = sender(**first)
    assert failing.send_due() == 1
    job = store.get(job_id)
    delivery = failing.deliveries.get(job_id)
    assert job.state == "done" and job.stage == "done; results not sent"
    assert f"seg.dcm + sr.dcm not sent to {where} yet (attempt 1 of 8, next in 1 s)" in job.error
    assert reason in job.error, job.error
    assert delivery.state == "pending" and delivery.attempts == 1 and (scan_dir / "seg.dcm").is_file()
    assert failing.send_due() == 0  # not due before its retry time
    assert f"job {job_id}: seg.dcm + sr.dcm not sent to {where} yet (attempt 1 of 8" in caplog.text

    working = sender(**then)
    assert working.send_due(now=time.time() + 2) == 1
    delivery = working.deliveries.get(job_id)
    seg_uid = str(pydicom.dcmread(scan_dir / "seg.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert delivery.state == "sent" and delivery.attempts == 2 and seg_uid in delivery.sent and len(delivery.sent) == 2
    assert store.get(job_id).error is None and store.get(job_id).stage.startswith("done; seg.dcm + sr.dcm sent")
    found = orthanc.rest("POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": seg_uid}})
    assert len(found) == 1


@pytest.mark.slow
def test_job_survives_a_restart_and_results_wait_for_orthanc(small_phantom_series: dict, tmp_path: Path) -> None:
    """A series received by a server with no workers is a queued job; after a restart a worker runs it while the
    destination Orthanc is down (the job record and the log say so), and the results arrive once it is up."""
    import httpx

    from nodulenet.pacs.destination import c_store_files

    folder = tmp_path / "orthanc2"
    folder.mkdir()
    later = OrthancProcess(folder=folder, http_port=free_port(), dicom_port=free_port())
    write_config(folder, later.http_port, later.dicom_port)
    port = free_port()
    data = tmp_path / "data"
    args = ["--dicom-port", str(port), "--dicom-allow-ae", "ORTHANC", "--dicom-idle-s", "1", "--dicom-retry-s", "1",
            "--dicom-dest", f"ORTHANC@127.0.0.1:{later.dicom_port}"]
    try:
        with running_server(data, workers=0, args=args) as server:
            c_store_files(small_phantom_series["files"], calling_ae="ORTHANC", called_ae=LISTENER_AE,
                          host="127.0.0.1", port=port)
            queued = _wait_job(server, lambda j: j["state"] == "queued", timeout_s=60)
        with running_server(data, workers=1, args=args) as server:
            failed_send = _wait_job(server, lambda j: j["id"] == queued["id"] and j["state"] == "done"
                                    and j["error"] is not None)
            assert failed_send["stage"] == "done; results not sent"
            assert f"cannot open a DICOM association with ORTHANC@127.0.0.1:{later.dicom_port}" in failed_send["error"]
            assert f"job {queued['id']}: seg.dcm + sr.dcm not sent to" in server.log.read_text()
            assert _echo(port)
            later.start()
            later.add_modality("nodulenet", LISTENER_AE, port)
            sent = _wait_job(server, lambda j: j["id"] == queued["id"] and "sent to" in j["stage"], timeout_s=60)
            assert sent["error"] is None
            series = _series_by_modality(later, small_phantom_series["study_uid"])
            assert set(series) == {"SEG", "SR"}
            mask = httpx.get(f"{server.url}/v1/jobs/{sent['id']}/mask", headers=server.headers(), timeout=60)
            (tmp_path / "labels.nii.gz").write_bytes(mask.content)
            labels = _read_labels(tmp_path / "labels.nii.gz")
            decoded = _label_volume_from_seg(later.instance_file(series["SEG"][0]["Instances"][0]),
                                             small_phantom_series["sop_uids"], tmp_path)
            assert np.array_equal(decoded, labels)
    finally:
        later.stop()
