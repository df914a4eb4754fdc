"""Run ``nodulenet predict`` on another machine over SSH: :func:`nodulenet.remote.ssh.predict_over_ssh`.

Modules: ``connection`` (target parsing, host-key checks, keys, clear errors), ``transfer`` (what to upload
per scan; SFTP with byte counts; atomic result folders), ``session`` (remote commands: nodulenet check, work
folder, the streamed predict under a pty, cleanup), ``progress`` (rich bars / callback messages / remote.log),
``ssh`` (the runner). Only paramiko, never Qt/FastAPI/VTK.
"""
