"""L, R and the dealer in three Linux network namespaces joined by veth pairs on a bridge (10.203.0.0/24), each
link rate-limited by ``tc tbf`` where ``tc`` exists, and delayed: by ``tc netem`` if the kernel has it, else by a
userspace delay relay (``delay_proxy.py``) in the bridge's namespace that L and R are reached through. Each party is
its own ``aloe mpc party`` command over TLS. Skips, with the reason, when not root or when ``ip netns`` is refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aloe.cli import main

from .deployment import SRC, finish, party, write_config
from .netns import DELAY, IP
from .netns import namespaces as netns


@pytest.fixture
def namespaces():
    with netns() as n:
        yield n


def test_parties_in_separate_namespaces_over_a_shaped_delayed_link(namespaces, tmp_path):
    ns = namespaces["ns"]
    certs = tmp_path / "certs"
    assert main(["mpc", "certs", str(certs)]) == 0
    listen = {"L": f"{IP['L']}:7101", "R": f"{IP['R']}:7102"}
    proxy = None
    if namespaces["netem"]:
        addr = listen
    else:  # reach L and R through the delay relay on the bridge
        addr = {"L": f"{IP['H']}:7101", "R": f"{IP['H']}:7102"}
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", ns["H"], sys.executable, str(Path(__file__).with_name("delay_proxy.py")),
             "--delay", str(DELAY), f"{addr['L']}={listen['L']}", f"{addr['R']}={listen['R']}"],
            stdout=subprocess.PIPE, text=True)
        assert proxy.stdout.readline().strip() == "ready"
    train = "\n".join(["[train]", 'model = "lr"', 'dataset = "blobs"', "limit = 400", "batch = 200", "epochs = 1"])
    cfg = write_config(tmp_path / "deploy.toml", certs, addr, train, listen=listen,
                       extra={"L": [f'model_out = "{tmp_path}/model.pt"', f'checkpoints = "{tmp_path}/ck-L"'],
                              "R": [f'checkpoints = "{tmp_path}/ck-R"']})
    try:
        procs = {r: party(r, cfg, prefix=["ip", "netns", "exec", ns[r[0].upper()], "env", f"PYTHONPATH={SRC}"])
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
