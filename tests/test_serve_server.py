"""The real server (``nodulenet serve`` in a subprocess, uvicorn on 127.0.0.1, one worker with the shipped model) on
small phantom scans: a job's result equals local predict on the same scan (NIfTI upload and zipped DICOM series),
tokens, the upload limit, zip-slip/symlink members, a failing job, DELETE of a running job, and ``nodulenet predict
--server`` end to end."""

from __future__ import annotations

import io
import json
import stat
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.uid import CTImageStorage, generate_uid

from _serverproc import running_server
from nodulenet.io.dicom_write import new_file_dataset
from nodulenet.io.findings import read_findings_json
from nodulenet.io.image_files import read_image
from nodulenet.preprocess.phantom import PhantomConfig, make_phantom, write_phantom

pytestmark = pytest.mark.timeout(300)

SMALL = PhantomConfig(shape_yx=(160, 160), spacing_yx_mm=(1.25, 1.25), extent_z_mm=100.0,
                      slice_thickness_range_mm=(2.5, 2.5), n_nodules=2, diameter_range_mm=(8.0, 14.0))
SEED = 2
THRESHOLD = 0.9  # the demo model's few most confident findings: a fast export, still several findings


def write_dicom_series(volume, folder: Path, seed: int) -> str:
    """``volume`` (identity direction) as a CT series of one file per slice, HU stored as-is; returns the series
    UID. Carries the patient/study attributes a DICOM SEG needs to reference it."""
    folder.mkdir(parents=True, exist_ok=True)
    g = volume.geometry
    assert np.allclose(g.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    sz, sy, sx = g.spacing_zyx
    study, series, frame = (generate_uid(entropy_srcs=[f"nodulenet-serve-test-{seed}-{k}"])
                            for k in ("study", "series", "frame"))
    for k in range(g.shape_zyx[0]):
        path = folder / f"{k:04d}.dcm"
        sop_uid = generate_uid(entropy_srcs=[f"nodulenet-serve-test-{seed}-slice-{k}"])
        ds = new_file_dataset(path, CTImageStorage, sop_uid)
        ds.Modality, ds.Manufacturer = "CT", "NoduleNet tests"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Server", f"PH-{seed}", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20250101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        x0, y0, z0 = g.origin_xyz_mm
        ds.ImagePositionPatient = [float(x0), float(y0), float(z0 + k * sz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.Rows, ds.Columns = g.shape_zyx[1], g.shape_zyx[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, 0.0
        ds.PixelData = np.ascontiguousarray(volume.array[k], dtype=np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return series


def assert_same_findings(got: Path, expected: Path) -> None:
    """Findings of two nodules.json files: same ids, scores to 1e-6, centres to 1e-4 mm, same sizes."""
    a, b = read_findings_json(got), read_findings_json(expected)
    assert [f.id for f in a.findings] == [f.id for f in b.findings]
    assert len(a.findings) >= 1
    for fa, fb in zip(a.findings, b.findings):
        assert abs(fa.score - fb.score) <= 1e-6, (fa.id, fa.score, fb.score)
        np.testing.assert_allclose(fa.center_world_xyz_mm, fb.center_world_xyz_mm, atol=1e-4)
        assert fa.box_zyx == fb.box_zyx and fa.voxel_count == fb.voxel_count
    assert a.threshold == b.threshold and a.model.weights_sha256 == b.model.weights_sha256


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("serve_scans")
    nifti = write_phantom(root / "nifti", SEED, SMALL, fmt="nii.gz")["scan"]
    series = write_dicom_series(make_phantom(SEED, SMALL).image, root / "dicom" / "PH-2", SEED)
    broken = root / "broken" / "scan.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(nifti.read_bytes()[:4000])  # a truncated download: gzip magic, unreadable image
    return {"root": root, "nifti": nifti, "dicom": root / "dicom" / "PH-2", "series_uid": series, "broken": broken}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("serve_data") / "data", workers=1,
                        args=["--max-upload-mb", "5"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(scans, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local predict on the NIfTI phantom, same model and threshold: the reference."""
    from nodulenet.infer.cohort import Shard
    from nodulenet.predict_api import PredictOptions, predict_scans

    out = tmp_path_factory.mktemp("serve_local")
    run = predict_scans([scans["nifti"]], out, PredictOptions(threshold=THRESHOLD, threads=1),
                        shard=Shard(rank=0, world_size=1, local_rank=0))
    assert run.results[0].status == "done", run.results[0].error
    return out


def _jobs_on_disk(server) -> set[str]:
    return {p.name for p in (server.data_dir / "jobs").iterdir()}


def test_health_and_info(server) -> None:
    from nodulenet.infer.weights import file_sha256, shipped_weights_path

    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "ready": True, "workers": {"configured": 1, "ready": 1}}
    info = server.client().info()
    assert info["model"]["weights_sha256"] == file_sha256(shipped_weights_path())
    assert info["device"] == "cpu" and info["limits"]["max_upload_mb"] == 5.0
    assert "not a medical device" in info["disclaimer"]
    assert server.url.startswith("http://127.0.0.1:")


def test_wrong_or_missing_token_is_401(server) -> None:
    from nodulenet.serve.client import ServerAuthError, ServerClient

    for headers in ({}, server.headers("not-the-token")):
        r = httpx.get(f"{server.url}/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(ServerAuthError) as err:
        ServerClient(server.url, "not-the-token-at-all").info()
    assert "refused the token" in str(err.value) and server.url in str(err.value)


def test_oversize_upload_is_413_and_nothing_is_kept(server, tmp_path: Path) -> None:
    from nodulenet.serve.client import ServerError

    big = tmp_path / "big.nii.gz"
    big.write_bytes(b"\x1f\x8b" + np.random.default_rng(0).bytes(6_000_000))
    before = _jobs_on_disk(server)
    with pytest.raises(ServerError) as err:
        server.client().submit(big)
    assert err.value.status == 413 and "limit of 5 MB" in str(err.value)
    # a client that does not send Content-Length (chunked): cut off while streaming
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n\r\n'
        for _ in range(6):
            yield b"\x1f\x8b" + b"\0" * 1_000_000
        yield b"\r\n--b--\r\n"
    r = httpx.post(f"{server.url}/v1/jobs", content=chunks(), headers={
        **server.headers(), "Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "limit of 5 MB" in r.json()["detail"]
    assert _jobs_on_disk(server) == before


def _zip(members: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            if mode:
                info.create_system, info.external_attr = 3, mode << 16
            archive.writestr(info, data)
    return buf.getvalue()


@pytest.mark.parametrize("members, words", [
    ([("series/0001.dcm", b"x", 0), ("../../../../slip-escaped.dcm", b"owned", 0)], "escapes the job folder"),
    ([("/tmp/abs-escaped.dcm", b"owned", 0)], "absolute path"),
    ([("series/link.dcm", b"/etc/passwd", stat.S_IFLNK | 0o777)], "symbolic link"),
])
def test_zip_slip_absolute_and_symlink_members_are_refused(server, members, words) -> None:
    before = _jobs_on_disk(server)
    r = httpx.post(f"{server.url}/v1/jobs", headers=server.headers(), files={"file": ("s.zip", _zip(members))})
    assert r.status_code == 400 and words in r.json()["detail"]
    assert _jobs_on_disk(server) == before
    for root in (server.data_dir.parent, server.data_dir, Path("/tmp")):
        assert not list(root.glob("*-escaped.dcm"))


def test_nifti_upload_gives_the_same_result_as_local_predict(server, scans, local, tmp_path: Path) -> None:
    client = server.client()
    job = client.submit(scans["nifti"], threshold=THRESHOLD)
    assert job["state"] == "queued" and job["input"]["kind"] == "nifti"
    seen: list[tuple[float, str]] = []
    done = client.wait(job["id"], poll_s=0.1, on_progress=lambda j: seen.append((j["progress"], j["stage"])))
    progress = [p for p, _ in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0  # never goes backwards
    assert "predicting" in {s for _, s in seen}
    assert done["state"] == "done" and done["attempts"] == 1 and done["n_findings"] >= 1
    files = client.download(job["id"], tmp_path / "got")
    assert sorted(p.name for p in files) == sorted(p.name for p in (local / "scan").iterdir())
    assert_same_findings(tmp_path / "got" / "nodules.json", local / "scan" / "nodules.json")
    assert np.array_equal(read_image(tmp_path / "got" / "labels.nii.gz").array,
                          read_image(local / "scan" / "labels.nii.gz").array)
    assert (tmp_path / "got" / "candidates.csv").read_text() == (local / "scan" / "candidates.csv").read_text()
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}/seg", headers=server.headers())
    assert r.status_code == 404 and "input was not DICOM" in r.json()["detail"]
    report = httpx.get(f"{server.url}/v1/jobs/{job['id']}/report", headers=server.headers())
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")


def test_zipped_dicom_series_gives_seg_and_the_same_findings(server, scans, local, tmp_path: Path) -> None:
    import pydicom

    client = server.client()
    job = client.submit(scans["dicom"], threshold=THRESHOLD)
    assert job["input"]["kind"] == "dicom-zip"
    client.wait(job["id"], poll_s=0.2)
    seg_path = client.fetch(job["id"], "seg", tmp_path / "seg.dcm")
    seg = pydicom.dcmread(seg_path)
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == scans["series_uid"]
    nodules = client.fetch(job["id"], "nodules", tmp_path / "nodules.json")
    # the same volume as the NIfTI phantom: the same findings
    assert_same_findings(nodules, local / "scan" / "nodules.json")
    names = {f["name"] for f in client.job(job["id"])["files"]}
    assert {"seg.dcm", "sr.dcm", "nodules.json", "labels.nii.gz"} <= names
    # the web viewer's copy of the scan (made from the DICOM series on first request): the series' voxels, on the
    # label map's grid
    volume = tmp_path / "volume.nii.gz"
    volume.write_bytes(httpx.get(f"{server.url}/v1/jobs/{job['id']}/volume", headers=server.headers(),
                                 timeout=60).raise_for_status().content)
    labels = client.fetch(job["id"], "mask", tmp_path / "labels.nii.gz")
    scan, label_map, phantom = read_image(volume), read_image(labels), read_image(scans["nifti"])
    assert scan.geometry.shape_zyx == label_map.geometry.shape_zyx == phantom.geometry.shape_zyx
    np.testing.assert_allclose(scan.geometry.origin_xyz_mm, label_map.geometry.origin_xyz_mm, atol=1e-4)
    np.testing.assert_allclose(scan.geometry.spacing_zyx, label_map.geometry.spacing_zyx, atol=1e-5)
    np.testing.assert_array_equal(scan.array, phantom.array)


def test_a_scan_that_cannot_be_read_fails_with_one_line(server, scans) -> None:
    from nodulenet.serve.client import JobFailed

    client = server.client()
    job = client.submit(scans["broken"])
    with pytest.raises(JobFailed) as err:
        client.wait(job["id"], poll_s=0.1)
    error = err.value.job["error"]
    assert "\n" not in error and "Traceback" not in error and "scan.nii.gz" in error
    r = httpx.get(f"{server.url}/v1/jobs/{job['id']}/nodules", headers=server.headers())
    assert r.status_code == 409 and "is failed" in r.json()["detail"]


def test_delete_stops_a_running_job_and_the_worker_comes_back(server, scans) -> None:
    client = server.client()
    job = client.submit(scans["nifti"], threshold=THRESHOLD)
    deadline = time.monotonic() + 60
    while client.job(job["id"])["stage"] != "predicting":
        assert time.monotonic() < deadline, "the job never started predicting"
        time.sleep(0.05)
    assert client.delete(job["id"]) == {"id": job["id"], "deleted": True, "state": "running"}
    assert job["id"] not in _jobs_on_disk(server)
    assert httpx.get(f"{server.url}/v1/jobs/{job['id']}", headers=server.headers()).status_code == 404
    health = httpx.get(f"{server.url}/health").json()
    assert health["workers"]["ready"] == 0  # the worker that ran it is gone...
    deadline = time.monotonic() + 90
    while not httpx.get(f"{server.url}/health").json()["ready"]:  # ...and a new one loads the model
        assert time.monotonic() < deadline, "no worker came back after the DELETE"
        time.sleep(0.2)
    assert "killed to stop a cancelled job" in server.log.read_text()


def test_predict_cli_with_server_writes_what_local_predict_writes(server, scans, local, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from nodulenet.cli import app

    listing = tmp_path / "cohort.txt"
    listing.write_text(f"{scans['nifti']}\n{scans['broken']}\n")
    out = tmp_path / "out"
    args = ["predict", str(listing), "-o", str(out), "--server", server.url, "--token", server.token,
            "--threshold", str(THRESHOLD)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # one scan of the cohort failed: reported, the other done
    assert "1 of 2 scan(s) done" in result.output and "failed" in result.output
    assert_same_findings(out / "nifti_scan" / "nodules.json", local / "scan" / "nodules.json")
    assert sorted(p.name for p in (out / "nifti_scan").iterdir()) == sorted(p.name for p in (local / "scan").iterdir())
    assert read_findings_json(out / "nifti_scan" / "nodules.json").source.path == str(scans["nifti"])
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((local / "summary.json").read_text())["scans"][0]
    got = summary["scans"][0]
    assert (summary["n_scans"], summary["done"], summary["failed"]) == (2, 1, 1)
    assert (got["status"], got["n_findings"], got["findings"]) == ("done", expected["n_findings"], expected["findings"])
    assert got["out_dir"] == str(out / "nifti_scan") and got["details"]["server"]["url"] == server.url
    assert summary["scans"][1]["status"] == "failed" and "scan.nii.gz" in summary["scans"][1]["error"]
    config = json.loads((out / "predict_config.json").read_text())
    assert config["server"]["url"] == server.url
    assert config["model"]["weights_sha256"] == json.loads((local / "predict_config.json").read_text())[
        "model"]["weights_sha256"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no download temp folders left
    # run again: the complete output is kept, as local predict does
    again = CliRunner().invoke(app, args)
    assert "skipped" in again.output and again.exit_code == 1
