"""One command per party from a deployment file; inputs shared by their owners; bad files and plain peers."""

import json

import numpy as np
import torch

from aloe.cli import main
from aloe.mpc.nn import data as D
from aloe.mpc.nn.models import load_weights, plain_model
from aloe.mpc.nn.train import TrainConfig, accuracy

from .deployment import finish, free_port, party, start, write_config

N, HALF = 400, 5


def _addr():
    return {"L": f"127.0.0.1:{free_port()}", "R": f"127.0.0.1:{free_port()}"}


def test_bench_op_with_plain_loopback_channels(tmp_path):
    cfg = write_config(tmp_path / "deploy.toml", None, _addr(),
                       deployment='\ninsecure_loopback = true\nauthkey = "' + "ab" * 32 + '"')
    procs = {r: party(r, cfg, "--op", "gt", "--shape", "5x5", "--reps", "1") for r in ("L", "R", "dealer")}
    outs = finish(procs, 120)
    assert all(o[0] == 0 for o in outs.values()), {r: o[2][-300:] for r, o in outs.items()}
    left = json.loads(outs["L"][1])
    assert left["role"] == "L" and left["rounds"] == 4 and left["max_abs_error"] == 0.0
    assert json.loads(outs["dealer"][1])["offline_bits_per_element"] > 800


def test_owners_share_their_columns_and_only_l_learns_the_model(tmp_path):
    certs = tmp_path / "certs"
    assert main(["mpc", "certs", str(certs), "--owners", "alice,bob"]) == 0
    xa, _ = D.blobs_columns(N, 2 * HALF, 0, "L")
    xb, y = D.blobs_columns(N, 2 * HALF, 0, "R")
    (tmp_path / "alice").mkdir()
    (tmp_path / "bob").mkdir()
    np.savetxt(tmp_path / "alice" / "cols.csv", xa.numpy(), delimiter=",")
    np.save(tmp_path / "bob" / "cols.npy", torch.cat([xb, y.unsqueeze(1)], 1).numpy())
    owners = "\n".join([
        "[owners.alice]", "columns = 5", f'cert = "{certs}/owner-alice.pem"', f'key = "{certs}/owner-alice.key"',
        "[owners.bob]", "columns = 5", "labels = true", f'cert = "{certs}/owner-bob.pem"',
        f'key = "{certs}/owner-bob.key"'])
    train = "\n".join(["[train]", 'model = "lr"', 'dataset = "owners"', f"examples = {N}", "batch = 100",
                       "epochs = 2", 'reveal_to = ["L"]'])
    model_l, model_r = tmp_path / "model-L.pt", tmp_path / "model-R.pt"
    cfg = write_config(tmp_path / "deploy.toml", certs, _addr(), train, owners,
                       extra={"L": [f'model_out = "{model_l}"', f'checkpoints = "{tmp_path}/ck-L"'],
                              "R": [f'model_out = "{model_r}"', f'checkpoints = "{tmp_path}/ck-R"']})
    procs = {r: party(r, cfg) for r in ("L", "R", "dealer")}
    procs["alice"] = start(["mpc", "share", "--role", "owner", "--name", "alice", "--config", str(cfg),
                            "--data", str(tmp_path / "alice" / "cols.csv")])
    procs["bob"] = start(["mpc", "share", "--role", "owner", "--name", "bob", "--config", str(cfg),
                          "--data", str(tmp_path / "bob" / "cols.npy")])
    outs = finish(procs)
    assert all(o[0] == 0 for o in outs.values()), {r: o[2][-400:] for r, o in outs.items()}
    assert "shared 400 x 5 + labels with L and R" in outs["bob"][1]
    assert json.loads(outs["L"][1])["model_path"] == str(model_l)
    assert "model_path" not in json.loads(outs["R"][1]) and not model_r.exists()
    weights = torch.load(model_l, weights_only=True)["weights"]
    net = load_weights(plain_model("lr", features=2 * HALF, pool="max", seed=0), weights)
    cfg_eval = TrainConfig(model="lr", dataset="blobs", blobs=(N, 2 * HALF), test_limit=N)
    assert accuracy(cfg_eval, net) > 0.85


def test_bad_files_and_a_plain_party_against_tls_fail_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[deployment]\n[parties.L]\naddress = 'nowhere'\n")
    assert main(["mpc", "party", "--role", "L", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parties.L.address must be HOST:PORT" in err[0]
    plain = write_config(tmp_path / "plain.toml", None, {"L": "10.1.2.3:7000", "R": "127.0.0.1:7001"},
                         deployment='\ninsecure_loopback = true\nauthkey = "' + "ab" * 32 + '"')
    assert main(["mpc", "party", "--role", "R", "--config", str(plain), "--op", "mul"]) == 2
    assert "loopback addresses only" in capsys.readouterr().err
    # L runs with TLS, R was started with a plain-channel file for the same addresses
    certs = tmp_path / "certs"
    assert main(["mpc", "certs", str(certs)]) == 0
    addr = _addr()
    tls = write_config(tmp_path / "tls.toml", certs, addr, deployment="\ntimeout = 10"[0:0])
    plain = write_config(tmp_path / "plain2.toml", None, addr,
                         deployment='\ninsecure_loopback = true\nauthkey = "' + "ab" * 32 + '"')
    procs = {"L": party("L", tls, "--op", "mul"), "R": party("R", plain, "--op", "mul")}
    outs = finish(procs, 120)
    for role, (rc, _, e) in outs.items():
        lines = e.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("aloe: error:"), (role, e[-500:])
    assert "opened a plain channel" in outs["L"][2] and "require TLS" in outs["R"][2]
