"""Run ``prism serve`` as a real separate process for the tests that drive it over HTTP
(the server's own tests and curation against it): start on a free port, wait until
``/health`` answers, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prism_rl.jobs.serve import API_KEY_ENV


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_server_process(model_dir: str | Path, port: int | None = None, api_key: str | None = None, *,
                         host: str = "127.0.0.1", extra_args: tuple[str, ...] | list[str] = (),
                         log_path: str | Path | None = None) -> subprocess.Popen:
    """Start ``prism serve`` as a separate process (a free port if ``port`` is None).

    The returned ``Popen`` also carries ``.port``, ``.base_url`` (``http://host:port``, add
    ``/v1`` for an OpenAI client) and ``.log_path`` (its stdout and stderr). The API key goes
    through the environment, not the command line, where ``ps`` would show it. Call
    ``wait_until_ready`` before use and ``stop_server_process`` at the end.
    """
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "prism_rl.cli", "serve", "--model", str(model_dir), "--host", host,
           "--port", str(port), *map(str, extra_args)]
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="prism-serve-", suffix=".log")
        os.close(fd)
    # a file, not a pipe: an unread pipe fills up and blocks the server
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.port, proc.base_url, proc.log_path = port, f"http://{host}:{port}", str(log_path)
    return proc


def _log_tail(proc: subprocess.Popen | None, chars: int = 3000) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not Path(path).exists():
        return ""
    return "\n--- server log (tail) ---\n" + Path(path).read_text(errors="replace")[-chars:]


def wait_until_ready(base_url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET /health`` until the server answers; fail early if ``proc`` exits."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode}{_log_tail(proc)}")
        try:
            if httpx.get(f"{root}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {root} not ready after {timeout:.0f} s{_log_tail(proc)}")


def stop_server_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop the server (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
