"""Faults during a Network B epoch with L, R and the dealer in three network namespaces, each its own
``aloe mpc party`` command over TLS (links rate-limited by tbf where ``tc`` exists, no delay).

One unbroken run (2 epochs of 4 steps, 32 MNIST examples, batch 8) is the reference. Each broken run starts from a
copy of the reference's epoch-1 checkpoints of all three roles, so it shares the reference's run and keys; a party is
killed (SIGKILL) at step 2 of the second epoch, killed there and at once started again with the same command, or R
is cut off the network. Every surviving party must exit with code 2 and one error line within the bound (a kill: the
deployment's timeout at most; a partition: the timeout plus one heartbeat interval); a restarted party cannot rejoin
and exits the same way after the timeout; and the resumed run must end with exactly the reference's weights. Skips,
with the reason, when not root or when ``ip netns`` is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aloe.cli import main
from aloe.mpc.comm import heartbeat_interval
from aloe.mpc.nn.train import content_digest

from .deployment import SRC, write_config
from .netns import IP, namespaces, sh

TIMEOUT = 10  # the deployment's timeout (seconds)
FAULT = str(Path(__file__).with_name("fault_party.py"))
ROLES = ("L", "R", "dealer")
INTERNAL = {"L": "L", "R": "R", "dealer": "D"}
TRAIN = "\n".join(["[train]", 'model = "b"', 'pool = "avg"', "limit = 32", "batch = 8", "epochs = 2", "lr = 0.1"])


@pytest.fixture(scope="module")
def net():
    with namespaces(delay=False) as n:
        yield n


@pytest.fixture(scope="module")
def certs(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "certs"
    assert main(["mpc", "certs", str(d)]) == 0
    return d


def _write(run: Path, certs: Path, resume: bool) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    addr = {"L": f"{IP['L']}:7101", "R": f"{IP['R']}:7102"}
    extra = {r: [f'checkpoints = "{run}/ck-{INTERNAL[r]}"'] for r in ROLES}
    extra["L"].append(f'model_out = "{run}/model.pt"')
    cfg = write_config(run / "deploy.toml", certs, addr, TRAIN + ("\nresume = true" if resume else ""), extra=extra)
    cfg.write_text(cfg.read_text().replace("timeout = 30\n", f"timeout = {TIMEOUT}\n", 1))
    return cfg


def _start(net, cfg: Path, role: str, fault: tuple[str, int, int] | None = None) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", net["ns"][INTERNAL[role]], "env", f"PYTHONPATH={SRC}", sys.executable]
    if fault is not None and fault[0] == role:
        prefix += [FAULT, str(fault[1]), str(fault[2])]
    else:
        prefix += ["-m", "aloe.cli"]
    return subprocess.Popen([*prefix, "mpc", "party", "--role", role, "--config", str(cfg), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _launch(net, cfg: Path, fault: tuple[str, int, int] | None = None) -> dict:
    return {role: _start(net, cfg, role, fault) for role in ROLES}


def _wait(procs: dict, limit: float = 180.0, when=None) -> dict:
    """{role: (returncode, stdout, stderr, exit time)}; ``when`` (called while waiting) may act on the run."""
    exits: dict = {}
    end = time.monotonic() + limit
    while len(exits) < len(procs) and time.monotonic() < end:
        for role, p in procs.items():
            if role not in exits and p.poll() is not None:
                exits[role] = time.monotonic()
        if when is not None:
            when()
        time.sleep(0.02)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    return {role: (p.returncode, *p.communicate(), exits.get(role)) for role, p in procs.items()}


def _copy_epoch_1(ref: Path, run: Path) -> None:
    for r in ("L", "R", "D"):
        (run / f"ck-{r}" / r).mkdir(parents=True)
        shutil.copy(ref / f"ck-{r}" / r / "epoch-0001.pt", run / f"ck-{r}" / r)


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["weights"]


@pytest.fixture(scope="module")
def reference(net, certs, tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "reference"
    t0 = time.monotonic()
    outs = _wait(_launch(net, _write(run, certs, resume=False)))
    assert all(o[0] == 0 for o in outs.values()), {r: o[2][-500:] for r, o in outs.items()}
    left = json.loads(outs["L"][1])
    print(f"reference: {time.monotonic() - t0:.1f} s, training {left['train_seconds']:.1f} s")
    return SimpleNamespace(dir=run, weights=_weights(run))


def _one_error_line(out) -> str:
    rc, _, err, _ = out
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("aloe: error: "), (rc, err[-800:])
    return lines[0]


@pytest.mark.parametrize("killed", ROLES)
def test_a_party_killed_mid_epoch_stops_all_and_the_resume_ends_with_the_unbroken_weights(net, certs, reference,
                                                                                       tmp_path, killed):
    _copy_epoch_1(reference.dir, tmp_path)
    cfg = _write(tmp_path, certs, resume=True)
    outs = _wait(_launch(net, cfg, fault=(killed, 1, 2)))
    assert outs[killed][0] == -9, outs[killed][2][-500:]
    t_kill = outs[killed][3]
    who = INTERNAL[killed]
    stops = _others_stopped(outs, killed, who, t_kill)
    resume = _resume_ends_with_the_reference(net, cfg, tmp_path, reference)
    print(f"{killed} killed: the others stopped {', '.join(f'{r} {s:.2f} s' for r, s in stops.items())} after it; "
          f"resume {resume:.1f} s")


def _others_stopped(outs: dict, gone: str, who: str, t_kill: float) -> dict:
    """Each other party ended with one line naming the party that closed mid-run, within the bound; their delays."""
    stops = {}
    for role in ROLES:
        if role != gone:
            line = _one_error_line(outs[role])
            assert f"party {who} closed the connection mid-run without the end-of-run message" in line, \
                {r: o[2][-300:] for r, o in outs.items()}
            stops[role] = outs[role][3] - t_kill
    assert max(stops.values()) < TIMEOUT, stops
    return stops


def _resume_ends_with_the_reference(net, cfg: Path, tmp_path: Path, reference) -> float:
    """L and R stopped inside the second epoch (their last checkpoint is still epoch 1, no model written); a resume
    of all three ends with exactly the unbroken run's weights. Returns the resume's seconds."""
    for r in ("L", "R"):
        assert sorted(p.name for p in (tmp_path / f"ck-{r}" / r).iterdir()) == ["epoch-0001.pt"]
    assert not (tmp_path / "model.pt").exists()
    t0 = time.monotonic()
    resumed = _wait(_launch(net, cfg))
    assert all(o[0] == 0 for o in resumed.values()), {r: o[2][-500:] for r, o in resumed.items()}
    weights = _weights(tmp_path)
    assert weights.keys() == reference.weights.keys()
    for name, w in weights.items():
        assert torch.equal(w, reference.weights[name]), name
    return time.monotonic() - t0


@pytest.mark.parametrize("restarted", ROLES)
def test_a_party_restarted_mid_epoch_cannot_rejoin_and_the_resume_ends_with_the_unbroken_weights(
        net, certs, reference, tmp_path, restarted):
    _copy_epoch_1(reference.dir, tmp_path)
    cfg = _write(tmp_path, certs, resume=True)
    procs = _launch(net, cfg, fault=(restarted, 1, 2))
    again = {}

    def restart():  # the same party's command again, as soon as its process is dead
        if not again and procs[restarted].poll() is not None:
            again["at"] = time.monotonic()
            procs["again"] = _start(net, cfg, restarted)

    outs = _wait(procs, when=restart)
    assert outs[restarted][0] == -9, outs[restarted][2][-500:]
    assert again, "the party was never restarted"
    t_kill = outs[restarted][3]
    who = INTERNAL[restarted]
    stops = _others_stopped(outs, restarted, who, t_kill)
    # the restarted process finds no listener (or nobody connects to it) and gives up after the timeout
    line = _one_error_line(outs["again"])
    expected = "no party connected within" if restarted == "L" else "could not connect to party L at"
    assert expected in line and "cannot rejoin a run already under way" in line, line
    alone = outs["again"][3] - again["at"]
    assert TIMEOUT <= alone < TIMEOUT + 60.0, alone  # the timeout after its start-up (imports, data) on a busy host
    resume = _resume_ends_with_the_reference(net, cfg, tmp_path, reference)
    print(f"{restarted} killed and restarted: the others stopped "
          f"{', '.join(f'{r} {s:.2f} s' for r, s in stops.items())} after the kill; the restarted process gave up "
          f"{alone:.1f} s after its start; resume {resume:.1f} s")


def test_a_party_cut_off_the_network_stops_all_within_the_timeout(net, certs, reference, tmp_path):
    _copy_epoch_1(reference.dir, tmp_path)
    cfg = _write(tmp_path, certs, resume=True)
    dealer_done = tmp_path / "ck-D" / "D" / "epoch-0002.pt"
    cut = {}
    veth = ("ip", "-n", net["ns"]["R"], "link", "set", "dev", net["veth"]["R"])

    def partition():
        if not cut and dealer_done.exists():  # the dealer has sent the whole epoch; L and R are inside it
            sh(*veth, "down")
            cut["at"] = time.monotonic()

    try:
        outs = _wait(_launch(net, cfg), when=partition)
    finally:
        sh(*veth, "up")
    assert cut, "the dealer never finished the epoch"
    stops = {}
    for role in ROLES:
        line = _one_error_line(outs[role])
        assert "party R" in line or "from party L" in line, line
        stops[role] = outs[role][3] - cut["at"]
    bound = TIMEOUT + heartbeat_interval(TIMEOUT)
    assert max(stops.values()) < bound + 2.0, (stops, "|".join(o[2][-300:] for o in outs.values()))
    print(f"R cut off: {', '.join(f'{r} stopped {s:.2f} s' for r, s in stops.items())} after (bound {bound:g} s)")


def test_checkpoints_of_different_runs_stop_all_before_any_computation(net, certs, reference, tmp_path):
    _copy_epoch_1(reference.dir, tmp_path)
    path = tmp_path / "ck-R" / "R" / "epoch-0001.pt"
    state = torch.load(path, weights_only=True)
    state["run_id"] += 1  # a consistent file, but of another run
    state["digest"] = content_digest(state)
    torch.save(state, path)
    before = sorted(p.name for p in tmp_path.rglob("*.pt"))
    outs = _wait(_launch(net, _write(tmp_path, certs, resume=True)))
    lines = {role: _one_error_line(outs[role]) for role in ROLES}
    for role in ("L", "R"):
        assert "resume: the checkpoints of epoch 1 belong to different runs" in lines[role], lines[role]
    assert "stopped the run: resume: the checkpoints of epoch 1 belong to different runs" in lines["dealer"]
    assert sorted(p.name for p in tmp_path.rglob("*.pt")) == before  # nothing trained, nothing written
