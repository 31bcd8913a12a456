"""Helpers for the deployment tests: write a deploy.toml, start each party as its own command."""

import os
import socket
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, certs: Path | None, addr: dict, train: str = "", owners: str = "",
                 listen: dict | None = None, extra: dict | None = None, deployment: str = "") -> Path:
    """``addr``/``listen``: role -> "host:port" for L and R; ``extra``: role -> more lines of its table."""
    listen, extra = listen or {}, extra or {}
    lines = ["[deployment]", f"timeout = 30{deployment}"]
    if certs is not None:
        lines.append(f'ca = "{certs}/ca.pem"')
    for role, cert in (("L", "L"), ("R", "R"), ("dealer", "dealer")):
        lines.append(f"[parties.{role}]")
        if role in addr:
            lines.append(f'address = "{addr[role]}"')
        if role in listen:
            lines.append(f'listen = "{listen[role]}"')
        if certs is not None:
            lines += [f'cert = "{certs}/{cert}.pem"', f'key = "{certs}/{cert}.key"']
        lines += extra.get(role, [])
    path.write_text("\n".join(lines) + "\n" + owners + "\n" + train + "\n")
    return path


def start(args: list[str], prefix: list[str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([*(prefix or []), sys.executable, "-m", "aloe.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def party(role: str, cfg: Path, *more: str, prefix: list[str] | None = None) -> subprocess.Popen:
    return start(["mpc", "party", "--role", role, "--config", str(cfg), "--json", *more], prefix)


def finish(procs: dict, timeout: float = 240) -> dict:
    """{name: (returncode, stdout, stderr)}; kills what is left on a timeout."""
    out = {}
    for name, p in procs.items():
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
        out[name] = (p.returncode, o, e)
    return out
