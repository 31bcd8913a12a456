"""Running a server on loopback for the demo, the tests and the benchmarks: start, wait for health, stop."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from aloe import AloeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AloeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AloeError(f"the server at {url} did not become healthy within {timeout:.0f} s")


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, *, timeout: float = 300.0, log: Path | None = None,
                   path: str = "/health") -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``cmd`` (a server listening on 127.0.0.1:port), yield its URL once healthy, then stop it cleanly."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout, proc, path)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()


def aloe_serve_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aloe.cli", "serve", str(model_dir), "--port", str(port), *extra]


@contextlib.contextmanager
def app_thread(app, health: str = "/health") -> Iterator[str]:
    """An ASGI app on a free loopback port (uvicorn in a thread of this process): for tests."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60.0, path=health)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def server_thread(model_dir: Path, limits=None, threads: int | None = None) -> Iterator[str]:
    """The embedded server in this process (uvicorn in a thread): for tests."""
    from aloe.serving.server import create_app

    with app_thread(create_app(model_dir, limits, threads)) as url:
        yield url
