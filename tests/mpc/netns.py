"""L, R and the dealer in three Linux network namespaces joined by veth pairs on a bridge (10.203.0.0/24) in a
fourth one (the hub), each link rate-limited by ``tc`` where it exists (``netem`` with its delay if the kernel has it,
else ``tbf``). :func:`namespaces` skips the test, with the reason, when not root or when ``ip netns`` is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest

DELAY = 0.005  # one-way seconds
RATE = "100mbit"
IP = {"L": "10.203.0.1", "R": "10.203.0.2", "D": "10.203.0.3", "H": "10.203.0.9"}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def names(tag: str) -> tuple[dict, dict]:
    """The namespaces (L, R, D, H) and the veth inside each party's namespace, for ``tag``."""
    return ({r: f"aloe{r}{tag}" for r in ("L", "R", "D", "H")},
            {r: f"av{r}{tag}"[:15] for r in ("L", "R", "D")})


@contextmanager
def namespaces(tag: str | None = None, delay: bool = True):
    """Set up the namespaces; yields {"ns", "veth", "tc", "netem"}; removes them afterwards. Without ``delay`` the
    links are only rate-limited (tbf), never delayed."""
    tag = tag or f"{os.getpid() % 100000}"
    ns_of, veth = names(tag)
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    probe = sh("ip", "netns", "add", ns_of["H"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns is not permitted here: {probe.stderr.strip()}")
    try:
        hub = ns_of["H"]
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        sh("ip", "-n", hub, "addr", "add", f"{IP['H']}/24", "dev", "br0")
        tc = shutil.which("tc") is not None
        netem = False
        for r in ("L", "R", "D"):
            ns, v, b = ns_of[r], veth[r], f"ab{r}{tag}"[:15]
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", v, "type", "veth", "peer", "name", b)
            sh("ip", "link", "set", v, "netns", ns)
            sh("ip", "link", "set", b, "netns", hub)
            sh("ip", "-n", hub, "link", "set", b, "master", "br0")
            sh("ip", "-n", hub, "link", "set", b, "up")
            sh("ip", "-n", ns, "addr", "add", f"{IP[r]}/24", "dev", v)
            sh("ip", "-n", ns, "link", "set", v, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            if tc:
                q = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", v, "root", "netem", "delay",
                       f"{DELAY * 1e3:g}ms" if delay else "0ms", "rate", RATE, check=False)
                netem = q.returncode == 0 and delay
                if q.returncode != 0:
                    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", v, "root", "tbf", "rate", RATE,
                       "burst", "256kbit", "latency", "50ms")
        yield {"ns": ns_of, "veth": veth, "tc": tc, "netem": netem}
    finally:
        for ns in ns_of.values():
            sh("ip", "netns", "del", ns, check=False)
