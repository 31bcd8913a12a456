"""Secure training through three OS processes: accuracy against plain PyTorch, a party killed mid-epoch, resume."""

import json
import time

import pytest
import torch

from aloe import AloeError
from aloe.cli import main
from aloe.mpc.nn.train import TrainConfig, train

torch.set_num_threads(1)


def test_cli_lr_matches_plain_pytorch(tmp_path, capsys):
    out = tmp_path / "model.pt"
    code = main(["mpc", "train", "--model", "lr", "--epochs", "1", "--limit", "1024", "--batch", "64",
                 "--test-limit", "1000", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(out), "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["examples"] == 1024 and rep["steps_per_epoch"] == 16
    assert rep["plain_accuracy"] > 0.65  # the task is learnable in 16 steps
    assert abs(rep["accuracy"] - rep["plain_accuracy"]) <= 0.015
    assert rep["online_bytes"] > 0 and rep["offline_bytes"] > 0 and rep["rounds"] >= 16 * 3
    saved = torch.load(out, weights_only=True)
    assert saved["weights"]["0.weight"].shape == (784, 1)
    # each party's checkpoint holds its own shares only: neither share alone is the model
    ck_l = torch.load(tmp_path / "ckpt" / "L" / "epoch-0001.pt", weights_only=True)
    ck_r = torch.load(tmp_path / "ckpt" / "R" / "epoch-0001.pt", weights_only=True)
    assert ck_l["role"] == "L" and ck_r["role"] == "R"
    w = saved["weights"]["0.weight"]
    joint = (ck_l["shares"]["0.weight"] + ck_r["shares"]["0.weight"]).double() / 2**14
    assert (joint - w).abs().max() < 1e-3
    assert (ck_l["shares"]["0.weight"].double() / 2**14 - w).abs().max() > 1e3


def test_cli_network_a_matches_plain_pytorch_with_the_shorter_sign_compare(tmp_path, capsys):
    """Network A (two ReLU layers) on 1,024 MNIST examples: within 1.5 points of plain PyTorch, with the ReLU sign
    read from bit 31, and the plain run's ReLU inputs far inside the range that reads exactly."""
    code = main(["mpc", "train", "--model", "a", "--lr", "0.1", "--limit", "1024", "--batch", "64",
                 "--test-limit", "1000", "--checkpoint-dir", str(tmp_path / "ckpt"), "--json"])
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plain_accuracy"] > 0.4  # 16 steps are enough to learn something
    assert abs(rep["accuracy"] - rep["plain_accuracy"]) <= 0.015
    assert rep["sign_bits"] == 31 and rep["compare_input_range"] == 2.0**17
    assert 0 < rep["plain_compare_input_max"] < rep["compare_input_range"] / 1000


def test_cli_network_b_avg_pool_with_the_prefix_drelu(tmp_path, capsys):
    """Network B with avg-pool (its 4x larger first ReLU is where the prefix DReLU pays) on 1,024 MNIST examples: within
    1.5 points of plain PyTorch, and with less traffic than the same run with the G-module compare."""
    args = ["mpc", "train", "--model", "b", "--pool", "avg", "--lr", "0.1", "--limit", "1024", "--batch", "64",
            "--test-limit", "500", "--no-plain", "--json"]
    assert main([*args, "--drelu", "prefix", "--checkpoint-dir", str(tmp_path / "p")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["drelu"] == "prefix"
    args.remove("--no-plain")
    assert main([*args, "--drelu", "gmodule", "--checkpoint-dir", str(tmp_path / "g")]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["drelu"] == "gmodule" and ref["plain_accuracy"] > 0.3  # 16 steps are enough to learn something
    assert abs(rep["accuracy"] - ref["plain_accuracy"]) <= 0.015
    assert rep["online_bytes"] + rep["offline_bytes"] < 0.75 * (ref["online_bytes"] + ref["offline_bytes"])


def test_preprocessed_steps_time_the_online_phase_alone(tmp_path):
    """With the dealer's material delivered before each step, the run is the same training (accuracy within 1.5
    points of plain) and reports the steps' online time, which excludes the waits for the dealer."""
    cfg = TrainConfig(model="lr", epochs=1, limit=256, batch=64, test_limit=500, timeout=30.0, preprocess=True,
                      checkpoint_dir=str(tmp_path / "ckpt"))
    rep = train(cfg, progress=False, plain=True)
    assert rep["steps_per_epoch"] == 4
    assert 0 < rep["online_seconds"] < rep["train_seconds"]
    assert abs(rep["accuracy"] - rep["plain_accuracy"]) <= 0.015
    plain_run = train(TrainConfig(**{**cfg.__dict__, "preprocess": False, "checkpoint_dir": str(tmp_path / "c2")}),
                      progress=False, plain=False)
    assert plain_run["online_seconds"] is None
    assert plain_run["rounds"] == rep["rounds"] and plain_run["online_bytes"] == rep["online_bytes"]


def test_killed_party_stops_everyone_then_resume(tmp_path):
    cfg = TrainConfig(model="lr", epochs=2, limit=256, batch=64, test_limit=500, timeout=10.0,
                      checkpoint_dir=str(tmp_path / "ckpt"), fail_at=("R", 1, 2))
    out = tmp_path / "model.pt"
    t0 = time.monotonic()
    with pytest.raises(AloeError) as err:
        train(cfg, progress=False, out=out, plain=False)
    assert time.monotonic() - t0 < 120
    msg = str(err.value)
    # the dead party and the one that lost its peer are both reported (the dealer may already have finished: it
    # runs ahead of L and R)
    assert "R: party R" in msg and "L: party R closed the connection" in msg
    assert not out.exists()  # no model written for a failed run
    assert sorted(p.name for p in (tmp_path / "ckpt" / "L").iterdir()) == ["epoch-0001.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "R").iterdir()) == ["epoch-0001.pt"]
    resumed = TrainConfig(**{**cfg.__dict__, "fail_at": None, "resume": True})
    rep = train(resumed, progress=False, out=out, plain=True)
    assert rep["start_epoch"] == 1 and rep["epochs"] == 2
    assert rep["rounds"] < 11 * 4 * 1.5  # only the second epoch ran (11 rounds a step, 4 steps; two epochs: 88)
    assert out.exists()
    assert abs(rep["accuracy"] - rep["plain_accuracy"]) <= 0.03


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    ck = tmp_path / "ckpt"
    for role in ("L", "R"):
        (ck / role).mkdir(parents=True)
        torch.save({"fingerprint": "other", "role": role, "epoch": 1, "shares": {}, "momentum": {}},
                   ck / role / "epoch-0001.pt")
    cfg = TrainConfig(model="lr", epochs=2, limit=128, batch=64, timeout=10.0, checkpoint_dir=str(ck), resume=True)
    with pytest.raises(AloeError, match="another training run"):
        train(cfg, progress=False, plain=False)


def test_cli_rejects_bad_arguments(capsys):
    assert main(["mpc", "train", "--model", "lr", "--epochs", "0"]) == 2
    assert main(["mpc", "train", "--model", "b", "--data", "blobs"]) == 2
    assert main(["mpc", "train", "--model", "a", "--sign-bits", "15"]) == 2
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["mpc", "train", "--model", "a", "--drelu", "linear"])
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(e.startswith("aloe: error:") for e in err) == 3


def test_plain_compare_input_peak_counts_pre_activation_differences_before_a_max_pool():
    """One plain step of Network B with max-pool: the peak is the largest of twice each pooled ReLU's input (the
    secure model pools first and compares differences of pre-activations, negative ones included) and the plain
    input of the unpooled ReLU, computed here layer by layer from the same initialisation and batch."""
    from aloe.mpc.nn import data as D
    from aloe.mpc.nn.models import plain_model
    from aloe.mpc.nn.train import epoch_order, train_plain

    cfg = TrainConfig(model="b", pool="max", limit=64, batch=64)
    observed = {}
    train_plain(cfg, observed)
    x = D.mnist_images("train", 64)[epoch_order(64, 0, 0)]
    m = plain_model("b", pool="max", seed=0)
    with torch.no_grad():
        c0 = m[0](x)
        c1 = m[3](m[2](m[1](c0)))
        f1 = m[7](m[6](m[5](m[4](c1))))
    expect = max(2 * float(c0.abs().max()), 2 * float(c1.abs().max()), float(f1.abs().max()))
    assert observed["compare_input_max"] == pytest.approx(expect, rel=1e-6)
    assert float(c0.min()) < 0  # negative pre-activations exist: the pool's (non-negative) input alone misses them
