"""L, R and the dealer in three Linux network namespaces joined by veth pairs on a bridge (10.203.0.0/24), each
link rate-limited by ``tc tbf`` where ``tc`` exists, and delayed: by ``tc netem`` if the kernel has it, else by a
userspace delay relay (``delay_proxy.py``) in the bridge's namespace that L and R are reached through. Each party is
its own ``aloe mpc party`` command over TLS. Skips, with the reason, when not root or when ``ip netns`` is refused."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aloe.cli import main

from .deployment import SRC, finish, party, write_config

DELAY = 0.005  # one-way seconds
RATE = "100mbit"
TAG = f"{os.getpid() % 100000}"
NS = {r: f"aloe{r}{TAG}" for r in ("L", "R", "D", "H")}
IP = {"L": "10.203.0.1", "R": "10.203.0.2", "D": "10.203.0.3", "H": "10.203.0.9"}


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def _cleanup() -> None:
    for ns in NS.values():
        _sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    probe = _sh("ip", "netns", "add", NS["H"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns is not permitted here: {probe.stderr.strip()}")
    try:
        hub = NS["H"]
        _sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", hub, "link", "set", "br0", "up")
        _sh("ip", "-n", hub, "addr", "add", f"{IP['H']}/24", "dev", "br0")
        tc = shutil.which("tc") is not None
        netem = False
        for r in ("L", "R", "D"):
            ns, v, b = NS[r], f"av{r}{TAG}"[:15], f"ab{r}{TAG}"[:15]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", v, "type", "veth", "peer", "name", b)
            _sh("ip", "link", "set", v, "netns", ns)
            _sh("ip", "link", "set", b, "netns", hub)
            _sh("ip", "-n", hub, "link", "set", b, "master", "br0")
            _sh("ip", "-n", hub, "link", "set", b, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{IP[r]}/24", "dev", v)
            _sh("ip", "-n", ns, "link", "set", v, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            if tc:
                q = _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", v, "root", "netem", "delay",
                        f"{DELAY * 1e3:g}ms", "rate", RATE, check=False)
                netem = q.returncode == 0
                if not netem:
                    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", v, "root", "tbf", "rate", RATE,
                        "burst", "256kbit", "latency", "50ms")
        yield {"tc": tc, "netem": netem}
    finally:
        _cleanup()


def test_parties_in_separate_namespaces_over_a_shaped_delayed_link(namespaces, tmp_path):
    certs = tmp_path / "certs"
    assert main(["mpc", "certs", str(certs)]) == 0
    listen = {"L": f"{IP['L']}:7101", "R": f"{IP['R']}:7102"}
    proxy = None
    if namespaces["netem"]:
        addr = listen
    else:  # reach L and R through the delay relay on the bridge
        addr = {"L": f"{IP['H']}:7101", "R": f"{IP['H']}:7102"}
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", NS["H"], sys.executable, str(Path(__file__).with_name("delay_proxy.py")),
             "--delay", str(DELAY), f"{addr['L']}={listen['L']}", f"{addr['R']}={listen['R']}"],
            stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().strip() == "ready"
    train = "\n".join(["[train]", 'model = "lr"', 'dataset = "blobs"', "limit = 400", "batch = 200", "epochs = 1"])
    cfg = write_config(tmp_path / "deploy.toml", certs, addr, train, listen=listen,
                       extra={"L": [f'model_out = "{tmp_path}/model.pt"', f'checkpoints = "{tmp_path}/ck-L"'],
                              "R": [f'checkpoints = "{tmp_path}/ck-R"']})
    try:
        procs = {r: party(r, cfg, prefix=["ip", "netns", "exec", NS[r[0].upper()], "env", f"PYTHONPATH={SRC}"])
                 for r in ("L", "R", "dealer")}
        outs = finish(procs)
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
    assert all(o[0] == 0 for o in outs.values()), {r: o[2][-400:] for r, o in outs.items()}
    left = json.loads(outs["L"][1])
    assert left["model_path"] == f"{tmp_path}/model.pt"
    # every round waits at least one one-way delay on the L-R link
    assert left["train_seconds"] >= left["rounds"] * DELAY
    print(f"delay by {'netem' if namespaces['netem'] else 'userspace relay'}, rate by "
          f"{'netem' if namespaces['netem'] else 'tbf' if namespaces['tc'] else 'none'}: {left['rounds']} rounds in "
          f"{left['train_seconds']:.2f} s")
