"""``nodulenet predict --remote`` over a real OpenSSH sshd on loopback: what SSH adds to a local run.

1. **transfer**: SFTP (paramiko) upload and download of a DICOM series folder (LIDC-IDRI-0001: 133 slices + XML,
   68 MB; synthetic files of the same size without the data), in MB/s and files/s, through the runner's own
   functions (:mod:`nodulenet.remote.transfer`);
2. **end to end**: the same scan with ``nodulenet predict`` (fresh process, here) and ``nodulenet predict
   --remote`` (fresh process, the "remote" being this machine through sshd), both ``--threads 1``: the difference
   is the cost of SSH (connect, version check, upload, remote process start, download, cleanup).

Loopback has no network cost, so (1) is the CPU cost of SSH encryption + SFTP on this machine: an upper bound for
a fast LAN. Wall-clock figures depend on what else runs: the load average is recorded.

    .venv/bin/python benchmarks/remote_ssh.py [--data PATH] [--skip-e2e]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from _record import record  # noqa: E402


def _series(data: Path, root: Path) -> tuple[Path, str]:
    found = sorted((data / "LIDC-IDRI" / "LIDC-IDRI-0001").glob("*/*/*.xml"))
    if found:
        return found[0].parent, "LIDC-IDRI-0001 (DICOM series folder)"
    series = root / "synthetic" / "series"
    series.mkdir(parents=True)
    for i in range(134):  # same shape of work as LIDC-IDRI-0001: 134 files, 68 MB
        (series / f"{i:06d}.dcm").write_bytes(os.urandom(512 * 1024))
    return series, "synthetic: 134 files of 512 KiB (random bytes)"


def transfer(server: Any, series: Path, root: Path) -> dict[str, Any]:
    from nodulenet.remote.connection import connect
    from nodulenet.remote.transfer import Meter, download_folder, plan_upload, remote_files, upload_scan

    client = connect(server.target, identity_file=server.client_key, known_hosts=server.known_hosts)
    try:
        sftp = client.open_sftp()
        plan = plan_upload(series)
        remote = str(root / "remote-side")  # not remote_tmp: the end-to-end run checks that stays empty
        counted = [0]
        meter = Meter(lambda n: counted.__setitem__(0, counted[0] + n), lambda: None)
        t0 = time.perf_counter()
        upload_scan(sftp, plan, remote, meter, set())
        up_s = time.perf_counter() - t0
        files = remote_files(sftp, f"{remote}/{series.name}")
        t0 = time.perf_counter()
        download_folder(sftp, f"{remote}/{series.name}", files, root / "back" / series.name, meter)
        down_s = time.perf_counter() - t0
    finally:
        client.close()
    size_mb = plan.size / 1e6
    same = all((root / "back" / f.rel).read_bytes() == f.local.read_bytes() for f in plan.files)
    return {"files": len(plan.files), "size_mb": round(size_mb, 1), "upload_s": round(up_s, 2),
            "upload_mb_per_s": round(size_mb / up_s, 1), "upload_files_per_s": round(len(plan.files) / up_s, 1),
            "download_s": round(down_s, 2), "download_mb_per_s": round(size_mb / down_s, 1),
            "bytes_counted": counted[0] == 2 * plan.size, "round_trip_identical": same}


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout


def end_to_end(server: Any, scan: Path, root: Path) -> dict[str, Any]:
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    base = [sys.executable, "-m", "nodulenet", "predict", str(scan), "--threads", "1"]
    load_start = os.getloadavg()
    local_s, _ = _timed([*base, "-o", str(root / "local")], env)
    remote_s, _ = _timed([*base, "-o", str(root / "remote"), "--remote", server.target, "--remote-python",
                          sys.executable, "--identity", str(server.client_key)],
                         {**env, "NODULENET_KNOWN_HOSTS": str(server.known_hosts)})
    local = json.loads((root / "local" / "summary.json").read_text())["scans"][0]
    remote = json.loads((root / "remote" / "summary.json").read_text())["scans"][0]
    return {"local_wall_s": round(local_s, 2), "remote_wall_s": round(remote_s, 2),
            "ssh_overhead_s": round(remote_s - local_s, 2),
            "local_predict_s": local["seconds"], "remote_predict_s": remote["seconds"],
            # Wall time outside the scan's own prediction (imports, model load; for --remote also connect,
            # version check, upload, download, cleanup): steadier than the difference of the walls on a busy
            # machine, where the prediction alone varies by seconds from run to run.
            "local_outside_predict_s": round(local_s - local["seconds"], 2),
            "remote_outside_predict_s": round(remote_s - remote["seconds"], 2),
            "ssh_overhead_outside_predict_s": round((remote_s - remote["seconds"]) - (local_s - local["seconds"]), 2),
            "n_findings_local": local["n_findings"], "n_findings_remote": remote["n_findings"],
            "outputs": sorted(p.name for p in (root / "remote" / remote["name"]).iterdir()),
            "remote_tmp_left": server.remote_tmp_entries(),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("NODULENET_TEST_DATA",
                                                                         REPO.parent / "shared" / "data")))
    parser.add_argument("--skip-e2e", action="store_true", help="Transfer figures only.")
    args = parser.parse_args()
    from _sshd import find_sshd, running_sshd

    if find_sshd() is None:
        raise SystemExit("sshd not installed (apt-get install openssh-server)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        series, what = _series(args.data, root)
        with running_sshd(root / "sshd") as server:
            figures: dict[str, Any] = {"scan": what, "transfer": transfer(server, series, root)}
            print("transfer:", figures["transfer"])
            if not args.skip_e2e:
                figures["end_to_end"] = end_to_end(server, series, root)
                print("end to end:", figures["end_to_end"])
    record("remote_ssh", figures)


if __name__ == "__main__":
    main()
