"""The PACS pieces that need no Orthanc: the DICOM series writer (geometry read back by the project's DICOM reader),
credentials files, destinations and AE titles, the series assembler (idle -> job in the real SQLite store, queue
full, restart) and the recovery of a series whose job was never recorded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from nodulenet.errors import InputError, NoduleNetError
from nodulenet.io.dicom import read_dicom_series
from nodulenet.io.dicom_write import SeriesIdentity, write_ct_series
from nodulenet.io.volume import Geometry, Volume
from nodulenet.pacs.auth import parse_auth
from nodulenet.pacs.settings import DicomSettings, parse_destination
from nodulenet.serve.store import JobStore

pytest.importorskip("pynetdicom")


def small_volume(flip: bool = False) -> Volume:
    rng = np.random.default_rng(7)
    array = rng.integers(-1024, 1500, size=(5, 6, 7)).astype(np.int16)
    direction = (1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0) if flip else (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    geometry = Geometry((5, 6, 7), (2.5, 0.8, 0.7), (-12.25, 30.5, -100.125), direction)
    return Volume.from_geometry(array, geometry, {})


@pytest.mark.parametrize("flip", [False, True])
def test_written_series_reads_back_with_the_same_voxels_and_geometry(tmp_path: Path, flip: bool) -> None:
    volume = small_volume(flip)
    identity = SeriesIdentity(patient_id="P-1")
    paths = write_ct_series(volume, tmp_path / "ct", identity)
    assert [p.name for p in paths] == [f"{k:04d}.dcm" for k in range(1, 6)]
    back = read_dicom_series(tmp_path / "ct")
    assert np.array_equal(back.array, volume.array)
    assert back.geometry.shape_zyx == volume.geometry.shape_zyx
    np.testing.assert_allclose(back.geometry.spacing_zyx, (2.5, 0.8, 0.7), atol=1e-6)
    np.testing.assert_allclose(back.geometry.direction, volume.geometry.direction, atol=1e-9)
    # Voxel (z=4, y=5, x=6) lands where the DICOM formula puts it, computed here by hand.
    d = np.asarray(volume.geometry.direction).reshape(3, 3)
    expected = np.asarray(volume.geometry.origin_xyz_mm) + d @ (np.array([6, 5, 4]) * np.array([0.7, 0.8, 2.5]))
    np.testing.assert_allclose(back.geometry.voxel_to_world((4, 5, 6)), expected, atol=1e-5)
    first = pydicom.dcmread(paths[0])
    assert first.StudyInstanceUID == identity.study_uid and first.SeriesInstanceUID == identity.series_uid
    assert first.FrameOfReferenceUID == identity.frame_of_reference_uid and first.PatientID == "P-1"
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 5


def test_credentials_files(tmp_path: Path) -> None:
    assert parse_auth(None).kind == "none" and parse_auth("none").kind == "none"
    basic = tmp_path / "basic"
    basic.write_text("alice:s3cret:with-colon\n")
    os.chmod(basic, 0o600)
    auth = parse_auth(f"basic:{basic}")
    assert (auth.kind, auth.username, auth.secret) == ("basic", "alice", "s3cret:with-colon")
    assert "s3cret" not in repr(auth) and "s3cret" not in auth.describe()
    token = tmp_path / "token"
    token.write_text("abc.def.ghi\n")
    os.chmod(token, 0o600)
    session = parse_auth(f"bearer:{token}").apply(type("S", (), {"headers": {}})())
    assert session.headers["Authorization"] == "Bearer abc.def.ghi"
    os.chmod(token, 0o644)
    with pytest.raises(InputError, match="readable by other users"):
        parse_auth(f"bearer:{token}")
    bad = tmp_path / "bad"
    bad.write_text("no-colon\n")
    os.chmod(bad, 0o600)
    with pytest.raises(InputError, match="user:password"):
        parse_auth(f"basic:{bad}")
    with pytest.raises(InputError, match="does not exist"):
        parse_auth(f"basic:{tmp_path / 'missing'}")
    with pytest.raises(NoduleNetError, match="none, basic:FILE or bearer:FILE"):
        parse_auth("digest:/x")


def test_destinations_and_ae_titles() -> None:
    d = parse_destination("ORTHANC@127.0.0.1:4242")
    assert (d.kind, d.ae_title, d.host, d.port, str(d)) == ("dimse", "ORTHANC", "127.0.0.1", 4242,
                                                            "ORTHANC@127.0.0.1:4242")
    assert parse_destination("PACS@[::1]:104").host == "::1"
    stow = parse_destination("https://pacs.example.org/dicom-web/")
    assert (stow.kind, stow.url) == ("stow", "https://pacs.example.org/dicom-web")
    for bad in ("ORTHANC", "ORTHANC@host", "A_TITLE_LONGER_THAN_16@h:1", "X@h:70000"):
        with pytest.raises(NoduleNetError, match="--dicom-dest"):
            parse_destination(bad)
    with pytest.raises(NoduleNetError, match="at least one --dicom-allow-ae"):
        DicomSettings(port=11112, allowed_aes=())
    with pytest.raises(NoduleNetError, match="not a DICOM AE title"):
        DicomSettings(port=11112, allowed_aes=("BAD\\AE",))
    with pytest.raises(NoduleNetError, match="--dicom-dest-auth is for a DICOMweb"):
        DicomSettings.from_flags(port=1, allowed_aes=["A"], ae_title="N", host="127.0.0.1", idle_s=1,
                                 destination="A@h:1", destination_auth="none2:x")


def _instance(tmp_path: Path, series_uid: str, k: int) -> tuple[pydicom.Dataset, bytes]:
    volume = Volume.from_geometry(np.full((1, 4, 4), k, np.int16), Geometry((1, 4, 4), (1, 1, 1), (0, 0, k)), {})
    path = write_ct_series(volume, tmp_path / f"src-{series_uid}-{k}",
                           SeriesIdentity(series_uid=series_uid, study_uid="1.2.3"))[0]
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
    ds.save_as(path, enforce_file_format=True)
    return ds, path.read_bytes()


def test_assembler_queues_an_idle_series_and_survives_a_full_queue_and_a_restart(tmp_path: Path) -> None:
    from nodulenet.pacs.listener import (
        SERIES_RECORD,
        SeriesAssembler,
        reclaim_unqueued_series,
    )

    data = tmp_path / "data"
    store = JobStore(data / "jobs.sqlite3")
    settings = DicomSettings(port=0, allowed_aes=("PACS",), idle_s=5.0)
    assembler = SeriesAssembler(data, store, settings, threshold=0.4, queue_size=1)
    for k in range(3):
        ds, raw = _instance(tmp_path, "1.2.3.4", k)
        assert assembler.receive(ds, raw, "PACS", "127.0.0.1:5000") == (0, "")
    ds, raw = _instance(tmp_path, "1.2.3.4", 0)  # the same instance again: kept once
    assembler.receive(ds, raw, "PACS", "127.0.0.1:5000")
    (pending,) = assembler._pending.values()
    assert pending.n_instances == 3
    assert assembler.complete_idle(now=pending.last_received + 4.9) == []  # not idle long enough
    (job_id,) = assembler.complete_idle(now=pending.last_received + 5.0)
    job = store.get(job_id)
    assert job.state == "queued" and job.input_kind == "dicom-store" and job.scan_path == "input/1.2.3.4"
    assert job.options["threshold"] == 0.4 and job.options["dicom"]["calling_ae"] == "PACS"
    assert job.options["dicom"]["n_instances"] == 3 and job.options["dicom"]["study_instance_uid"] == "1.2.3"
    assert len(list((data / "jobs" / job_id / "input" / "1.2.3.4").glob("*.dcm"))) == 3
    assert not (data / "dicom-incoming" / "1.2.3.4").exists()
    assert read_dicom_series(data / "jobs" / job_id / "input" / "1.2.3.4").shape_zyx == (3, 4, 4)

    # A second series while the one queued job fills the queue: kept in dicom-incoming and tried again.
    ds, raw = _instance(tmp_path, "1.2.3.5", 0)
    assembler.receive(ds, raw, "PACS", "127.0.0.1:5000")
    assert assembler.complete_idle(now=1e12) == []
    assert (data / "dicom-incoming" / "1.2.3.5" / f"{ds.SOPInstanceUID}.dcm").is_file()
    assert store.counts()["queued"] == 1

    # Restart: the waiting series is picked up again from disk, with what was known about its sender.
    again = SeriesAssembler(data, store, settings, threshold=0.4, queue_size=5)
    assert again.pending_series() == ["1.2.3.5"]
    (second,) = again.complete_idle(now=1e12)
    assert store.get(second).options["dicom"]["calling_ae"] == "PACS"

    # A series moved into a job folder whose job was never recorded (a crash in between) is received again.
    orphan = data / "jobs" / ("f" * 32)
    (orphan / "input" / "1.2.3.6").mkdir(parents=True)
    (orphan / SERIES_RECORD).write_text("{}")
    (orphan / "input" / "1.2.3.6" / "9.dcm").write_bytes(raw)
    assert reclaim_unqueued_series(data, store, settings) == ["1.2.3.6"]
    assert (data / "dicom-incoming" / "1.2.3.6" / "9.dcm").read_bytes() == raw and not orphan.exists()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_assembler_refuses_an_instance_without_uids(tmp_path: Path) -> None:
    from nodulenet.pacs.listener import STATUS_CANNOT_UNDERSTAND, SeriesAssembler

    data = tmp_path / "data"
    assembler = SeriesAssembler(data, JobStore(data / "jobs.sqlite3"), DicomSettings(port=0, allowed_aes=("A",)),
                                threshold=0.5, queue_size=5)
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = "1.2"
    ds.SeriesInstanceUID = "1.2/../../etc"
    status, comment = assembler.receive(ds, b"", "A", "x")
    assert status == STATUS_CANNOT_UNDERSTAND and "SeriesInstanceUID" in comment
    assert list((data / "dicom-incoming").iterdir()) == []


def test_phantom_as_dicom_series_is_the_phantom(tmp_path: Path) -> None:
    from nodulenet.preprocess.phantom import PhantomConfig, make_phantom, write_phantom

    config = PhantomConfig(shape_yx=(96, 96), spacing_yx_mm=(1.5, 1.5), extent_z_mm=60.0,
                           slice_thickness_range_mm=(2.5, 2.5), n_nodules=1, diameter_range_mm=(8.0, 10.0),
                           flip_xyz=(False, True, True))
    paths = write_phantom(tmp_path / "ph", 3, config, fmt="dicom")
    assert paths["scan"].is_dir() and paths["nodule_mask"].name == "nodule_mask.nii.gz"
    phantom = make_phantom(3, config)
    back = read_dicom_series(paths["scan"])
    assert np.array_equal(back.array, phantom.image.array)
    np.testing.assert_allclose(back.geometry.origin_xyz_mm, phantom.image.geometry.origin_xyz_mm, atol=1e-5)
    np.testing.assert_allclose(back.geometry.direction, phantom.image.geometry.direction, atol=1e-9)
    assert back.meta["series_instance_uid"] == phantom.series_uid
    again = write_phantom(tmp_path / "ph2", 3, config, fmt="dicom")  # same seed, same files, byte for byte
    assert [p.read_bytes() for p in sorted(paths["scan"].iterdir())] == \
        [p.read_bytes() for p in sorted(again["scan"].iterdir())]


def test_a_busy_dicom_port_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    from nodulenet.pacs.listener import DicomListener, SeriesAssembler

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = DicomSettings(port=port, allowed_aes=("PACS",))
        assembler = SeriesAssembler(tmp_path, JobStore(tmp_path / "jobs.sqlite3"), settings, threshold=0.5,
                                    queue_size=5)
        with pytest.raises(NoduleNetError, match=f"cannot listen for DICOM on 127.0.0.1:{port} .*--dicom-port"):
            DicomListener(assembler, settings).start()


def test_nodulenet_own_results_coming_back_are_acknowledged_and_not_predicted(tmp_path: Path) -> None:
    from nodulenet.export.dicom_source import MANUFACTURER
    from nodulenet.pacs.listener import SeriesAssembler

    store = JobStore(tmp_path / "jobs.sqlite3")
    assembler = SeriesAssembler(tmp_path, store, DicomSettings(port=0, allowed_aes=("A",), idle_s=0.1),
                                threshold=0.5, queue_size=5)
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.Manufacturer = "1.2.3", "1.2.4", "SEG", MANUFACTURER
    assert assembler.receive(ds, b"not kept", "A", "x") == (0, "")
    ds.Manufacturer = "Another vendor"  # somebody else's SEG is a series like any other (and fails as not CT)
    assert assembler.receive(ds, b"kept", "A", "x") == (0, "")
    assert assembler.pending_series() == ["1.2.4"]
    assert (tmp_path / "dicom-incoming" / "1.2.4" / "1.2.3.dcm").read_bytes() == b"kept"
