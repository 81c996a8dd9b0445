"""Test helper: a real ``mlflow server`` on loopback, for reading a store the way ``mlflow ui`` does.

    with serve("sqlite:////tmp/x/mlflow.db", "/tmp/x/mlartifacts") as client:
        client.search_runs(...)          # over HTTP, http://127.0.0.1:<port>

The server is ``mlflow server --backend-store-uri ... --host 127.0.0.1 --port <free> --workers 1``
with ``--allowed-hosts`` limited to that address (mlflow 3.x's host-header check; the defaults
would also accept private-network names) and without the job runner
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: no second process, faster start). Its whole
process group is terminated on exit, whatever happens inside the block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it spawns uvicorn), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(store_uri: str, artifacts_dir: Path, log_file, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start a server; return it and its URL, or ``""`` as URL if it died or timed out (then stopped)."""
    port = _free_port()
    url = f"http://{HOST}:{port}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri,
        "--artifacts-destination", str(artifacts_dir),
        "--host", HOST, "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"{HOST}:{port},localhost:{port}",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _healthy(url):
            return process, url
        time.sleep(0.25)
    _stop(process)
    return process, ""


@contextlib.contextmanager
def serve(store_uri: str, artifacts_dir: str | Path, *, timeout: float = 120.0, attempts: int = 3) -> Iterator:
    """Run ``mlflow server`` on ``store_uri``; yield an ``MlflowClient`` talking to it over HTTP.

    Waits at most ``timeout`` s per attempt for ``/health``; a server that exits early (e.g. the
    free port was taken in between) is retried on another port. Raises RuntimeError with the
    server's log if it never becomes healthy.
    """
    from mlflow.tracking import MlflowClient

    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as log_file:
        process, url = None, ""
        for _ in range(attempts):
            started = time.monotonic()
            process, url = _start(store_uri, artifacts_dir, log_file, timeout)
            if url or time.monotonic() - started >= timeout:  # healthy, or timed out: no retry
                break
        try:
            if not url:
                log_file.seek(0)
                raise RuntimeError(f"mlflow server did not become healthy:\n{log_file.read()[-4000:]}")
            yield MlflowClient(tracking_uri=url)
        finally:
            _stop(process)
