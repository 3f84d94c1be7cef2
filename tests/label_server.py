"""Start a real MONAI Label server on 127.0.0.1 for live tests, wait until it answers, stop it afterwards."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def label_server(cmd: list[str], log_path: Path, timeout: float = 240, env: dict[str, str] | None = None
                 ) -> Iterator[str]:
    """Run ``cmd`` (a server command with ``--port {port}`` in it) and yield its URL once ``/info/`` answers; the
    log goes to ``log_path`` and its tail into the error when the server does not start."""
    import requests

    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen([a.format(port=port) for a in cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    if requests.get(f"{url}/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"MONAI Label did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
