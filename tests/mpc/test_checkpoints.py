"""The checkpoints of the three roles and how a resume checks them: the epoch all three share, runs that do not fit
together, files modified, misnamed, of another role or another configuration, other data; per-epoch PRF keys."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from aloe import AloeError
from aloe.mpc.dealer import PRG, epoch_key, new_key
from aloe.mpc.nn.train import RunState, TrainConfig, _save_checkpoint, read_checkpoints, resume_epoch

E = 3


def ids(**epochs):
    """Run ids per epoch (index 0 unused) from ``e1=run`` keywords."""
    out = [0] * (E + 1)
    for k, v in epochs.items():
        out[int(k[1:])] = v
    return out


def test_resume_starts_at_the_last_epoch_all_three_checkpointed():
    none = ids()
    assert resume_epoch(E, {"L": none, "R": none, "D": none}) == 0
    # R checkpointed one epoch less than L (killed in between); the dealer ran ahead
    assert resume_epoch(E, {"L": ids(e1=7, e2=7), "R": ids(e1=7), "D": ids(e1=7, e2=7, e3=7)}) == 1
    # the dealer was killed between sending epoch 2's last message and writing its checkpoint
    assert resume_epoch(E, {"L": ids(e1=7, e2=7), "R": ids(e1=7, e2=7), "D": ids(e1=7)}) == 1


@pytest.mark.parametrize("runs, match", [
    ({"L": ids(e1=7, e2=7), "R": ids(e1=7, e2=8), "D": ids(e1=7, e2=7)},
     "the checkpoints of epoch 2 belong to different runs \\(L: run 7, R: run 8, the dealer: run 7\\)"),
    ({"L": ids(e1=7), "R": ids(e1=7), "D": ids()}, "the dealer holds no checkpoint while L and R hold epochs"),
    ({"L": ids(e3=7), "R": ids(e1=7, e2=7), "D": ids(e1=7, e2=7, e3=7)},
     "no epoch is checkpointed by all three parties \\(L: 3; R: 1, 2; the dealer: 1, 2, 3\\)"),
])
def test_checkpoints_that_do_not_fit_together_are_refused(runs, match):
    with pytest.raises(AloeError, match=match):
        resume_epoch(E, runs)


def _net(scale):
    params = [SimpleNamespace(name="0.weight", share=torch.arange(6).reshape(2, 3) * scale,
                              momentum=torch.ones(2, 3, dtype=torch.int64))]
    return SimpleNamespace(params=params), SimpleNamespace(state=lambda: {"0.weight": params[0].momentum})


@pytest.fixture
def saved(tmp_path):
    cfg = TrainConfig(model="lr", epochs=E, limit=64, batch=32, checkpoint_dir=str(tmp_path / "ck"), resume=True)
    keys = {"L": new_key(), "R": new_key()}
    for epoch in (1, 2):
        net, opt = _net(epoch)
        _save_checkpoint(cfg, "L", epoch, net, opt, RunState(5, {"L": keys["L"]}, "data-L"))
        _save_checkpoint(cfg, "R", epoch, net, opt, RunState(5, {"R": keys["R"]}, "data-R"))
        _save_checkpoint(cfg, "D", epoch, None, None, RunState(5, keys))
    return cfg, keys, tmp_path / "ck"


def test_each_role_reads_back_its_own_checkpoints(saved):
    cfg, keys, ck = saved
    got = read_checkpoints(cfg, "L", "data-L")
    assert sorted(got) == [1, 2] and got[2]["run_id"] == 5
    assert torch.equal(got[2]["shares"]["0.weight"], torch.arange(6).reshape(2, 3) * 2)
    dealer = read_checkpoints(cfg, "D")
    assert dealer[1]["keys"] == {"L": keys["L"].hex(), "R": keys["R"].hex()}
    assert "shares" not in dealer[1]  # the dealer holds no shares
    assert "keys" not in got[1] and keys["L"].hex() not in repr(got[1])  # L keeps a digest of its key only


def test_a_modified_misnamed_foreign_or_other_data_checkpoint_is_refused(saved):
    cfg, _, ck = saved
    path = ck / "L" / "epoch-0002.pt"
    state = torch.load(path, weights_only=True)
    state["shares"]["0.weight"][0, 0] += 1
    torch.save(state, path)
    with pytest.raises(AloeError, match="epoch-0002.pt was modified or is damaged"):
        read_checkpoints(cfg, "L", "data-L")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(AloeError, match="epoch-0002.pt cannot be read"):
        read_checkpoints(cfg, "L", "data-L")
    path.unlink()
    shutil.copy(ck / "L" / "epoch-0001.pt", path)
    with pytest.raises(AloeError, match="epoch-0002.pt holds epoch 1, its name says 2"):
        read_checkpoints(cfg, "L", "data-L")
    path.unlink()
    with pytest.raises(AloeError, match="written with other data than this party holds now"):
        read_checkpoints(cfg, "L", "data-L changed")
    shutil.copy(ck / "R" / "epoch-0001.pt", ck / "D" / "epoch-0001.pt")
    with pytest.raises(AloeError, match="is R's, not the dealer's"):
        read_checkpoints(cfg, "D")
    other = TrainConfig(**{**cfg.__dict__, "batch": 16})
    with pytest.raises(AloeError, match="belongs to another training run"):
        read_checkpoints(other, "R", "data-R")


def test_each_epoch_draws_from_its_own_key():
    key = new_key()
    assert epoch_key(key, 3) == epoch_key(key, 3) and len(epoch_key(key, 3)) == 16
    assert len({epoch_key(key, e) for e in range(5)} | {key}) == 6
    assert not torch.equal(PRG(epoch_key(key, 0)).int64((4,)), PRG(epoch_key(key, 1)).int64((4,)))
