"""Typer command ``nodulenet serve`` (registered by ``nodulenet.cli``); a thin wrapper over
:func:`nodulenet.serve.server.run_server`. FastAPI/uvicorn are imported inside the function (the ``server`` extra).

Register with::

    from nodulenet.commands.serve import serve_cmd
    app.command("serve")(serve_cmd)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs TLS "
                                                         "(--ssl-certfile/--ssl-keyfile) or --insecure."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port; the URL is in <data>/server.json)."),
    data: Path = typer.Option(Path("nodulenet-server"), "--data", help="Folder for the job store, uploads, results, "
                                                                        "token and server.log."),
    workers: int = typer.Option(1, "--workers", help="Inference processes, each loading the model once (0: accept "
                                                     "and store jobs without running them)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="NODULENET_TOKEN", help="Bearer token, or a file "
                                        "holding it. Default: <data>/token, created (0600) on first start."),
    max_upload_mb: float = typer.Option(1024.0, "--max-upload-mb", help="Largest upload (one request), MB."),
    max_unpacked_mb: float = typer.Option(4096.0, "--max-unpacked-mb", help="Most a zip may unpack to, MB."),
    queue_size: int = typer.Option(100, "--queue-size", help="Most jobs waiting; more get 503 + Retry-After."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Checkpoint (default: the shipped demo model)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda:N)."),
    threshold: float = typer.Option(0.5, "--threshold", help="Default threshold of jobs that do not give one."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per worker (default: the CPU cores "
                                                                  "shared out between the workers)."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM): serve https."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without TLS (the token "
                                                            "then crosses the network in clear text)."),
    dicom_port: Optional[int] = typer.Option(None, "--dicom-port", help="Also listen for DICOM C-ECHO/C-STORE on "
                                             "this port (e.g. 11112); each received series becomes a job."),
    dicom_host: str = typer.Option("127.0.0.1", "--dicom-host", help="Address of the DICOM listener (0.0.0.0: all; "
                                                                     "DICOM has no token: allow AE titles)."),
    ae_title: str = typer.Option("NODULENET", "--ae-title", help="The listener's own AE title (also the calling AE "
                                                                 "title when sending results)."),
    dicom_allow_ae: list[str] = typer.Option([], "--dicom-allow-ae", help="A calling AE title that may send studies "
                                             "(repeat for several); all others are refused at association."),
    dicom_idle_s: float = typer.Option(10.0, "--dicom-idle-s", help="A series is complete after this many seconds "
                                                                    "without a new instance."),
    dicom_dest: Optional[str] = typer.Option(None, "--dicom-dest", help="Where SEG + SR go: AE@host:port "
                                             "(C-STORE) or the http(s):// root of a DICOMweb server (STOW-RS)."),
    dicom_dest_auth: Optional[str] = typer.Option(None, "--dicom-dest-auth", help="STOW-RS credentials: "
                                                  "basic:FILE (user:password) or bearer:FILE."),
    dicom_retry_s: float = typer.Option(15.0, "--dicom-retry-s", help="First retry of results that could not be "
                                        "sent (doubling each time, at most 10 min; 8 tries in all)."),
) -> None:
    """Serve predictions over HTTP (FastAPI + uvicorn): upload a scan, poll the job, download the outputs; with
    --dicom-port also a DICOM listener that predicts received series and sends SEG + SR to --dicom-dest.
    Research software, not a medical device. API: docs/server.md, docs/hospital.md; schema: GET /openapi.json."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    from nodulenet.serve.server import run_server
    from nodulenet.serve.settings import ServerSettings, resolve_token

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    data = data.expanduser().resolve()
    secret, source = resolve_token(data, token)
    settings = ServerSettings(
        data_dir=data, token=secret, host=host, port=port, workers=workers, max_upload_mb=max_upload_mb,
        max_unpacked_mb=max_unpacked_mb, queue_size=queue_size, weights=weights.resolve() if weights else None,
        device=device, threshold=threshold, threads=threads, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
        insecure=insecure)
    if weights is not None and not weights.is_file():
        from nodulenet.errors import InputError

        raise InputError(weights, "weights file does not exist")
    services = []
    if dicom_port is not None:
        from nodulenet.pacs.service import DicomService
        from nodulenet.pacs.settings import DicomSettings

        dicom = DicomSettings.from_flags(port=dicom_port, allowed_aes=dicom_allow_ae, ae_title=ae_title,
                                         host=dicom_host, idle_s=dicom_idle_s, destination=dicom_dest,
                                         destination_auth=dicom_dest_auth, retry_s=dicom_retry_s)
        services.append(DicomService(dicom, data, threshold=threshold, queue_size=queue_size))
    elif dicom_allow_ae or dicom_dest or dicom_dest_auth:
        from nodulenet.errors import NoduleNetError

        raise NoduleNetError("--dicom-allow-ae/--dicom-dest/--dicom-dest-auth configure the DICOM listener: give "
                             "--dicom-port too")
    run_server(settings, token_source=source, say=console.print, services=services)
