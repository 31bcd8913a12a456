"""Secure training end to end: the three parties' program, checkpoints, the launcher and the plain baseline.

:func:`train` launches L, R and the dealer as three OS processes (:func:`aloe.mpc.party.run_processes`). Each party
loads only its own data (:mod:`aloe.mpc.nn.data`), builds the secure model from the public seeded initialisation,
and runs mini-batch SGD with momentum: per step the data owners share the batch (no online traffic), the model runs
forward and backward on shared tensors, and the update is local. After each completed epoch every party writes a
checkpoint (atomically) of what it alone holds: L and R their own shares and momentum, the dealer its two PRF keys;
every epoch draws its randomness from keys derived from those and the epoch (:func:`aloe.mpc.dealer.epoch_key`). At
the end only the model owner L gets the weights revealed. The launcher then trains the same model in plain PyTorch on
the same data, initialisation, batch order and (quantised) learning rate, and evaluates both on the held-out set.

A party that dies makes the others stop with a channel error; the launcher then raises with every party's error and
writes no model. Before any computation the three parties compare their configurations and, with ``resume=True``,
their checkpoints (:func:`resume_epoch`): the run continues from the last epoch all three checkpointed in the same
run, with the dealer's keys of that run, so it ends with the weights of the unbroken run; checkpoints that do not fit
together (another run, another configuration, a file modified or damaged, other data) stop every party with one
error.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from aloe import AloeError
from aloe.assets.cache import cache_root
from aloe.mpc import kernels
from aloe.mpc.functions import sigmoid_coefficients
from aloe.mpc.gmodule import COMPARE_BITS, DRELU_METHODS
from aloe.mpc.nn import data as D
from aloe.mpc.nn.layers import DEFAULT_CHUNK
from aloe.mpc.nn.losses import sigmoid_bce_grad, softmax_ce_grad
from aloe.mpc.nn.models import MODELS, POOLS, load_weights, plain_model, secure_model
from aloe.mpc.nn.optim import SGD, quantize_rate
from aloe.mpc.nn.wan import profile, shape_links
from aloe.mpc.party import Party, run_processes
from aloe.mpc.tensor import OwnedInput, SharedTensor
from aloe.mpc.triples import meta

# the bit the ReLU and max-pool compares read the sign from (see TrainConfig.sign_bits)
DEFAULT_SIGN_BITS = 31
DEFAULT_DRELU = "prefix"
DEFAULT_LR = {"lr": 0.1, "a": 0.01, "b": 0.01, "c": 0.01, "d": 0.01}
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class TrainConfig:
    model: str
    epochs: int = 1
    limit: int | None = None
    dataset: str = "mnist"
    batch: int = 128
    lr: float | None = None  # default per model (DEFAULT_LR)
    momentum: float = 0.9
    pool: str = "max"
    seed: int = 0
    frac_bits: int = 14
    softmax_steps: int = 32
    wan: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    timeout: float = 60.0
    chunk: int = DEFAULT_CHUNK
    # the ReLU and max-pool compares read the sign from this bit: exact while their inputs stay below
    # 2^(sign_bits - frac_bits) in absolute value (2^17 = 131,072 by default); 63 is exact for every value
    sign_bits: int = DEFAULT_SIGN_BITS
    # how ReLU and max-pool compute the sign bit: the G-module compare or the parallel-prefix carry (same bit)
    drelu: str = DEFAULT_DRELU
    test_limit: int | None = None
    # before each step the dealer delivers all of that step's correlated randomness, and L and R start the step
    # only then: the offline/online split of the protocols, with the online phase timed on its own
    preprocess: bool = False
    blobs: tuple[int, int] = (5000, 20)
    # the channels: TLS with this bundle (None: a fresh one per run), or plain loopback TCP
    certs: str | None = None
    insecure_loopback: bool = False
    # a party's own data directory (MNIST files it owns; deployments only, None: the shared data directory)
    data_dir: str | None = None
    # dataset "owners": (name, columns, labels) of each data owner that shares its columns (aloe mpc share)
    owners: tuple = ()
    # the public number of examples when a party cannot read it from its data (the dealer; data from owners)
    examples: int | None = None
    # the parties that learn the trained model
    reveal_to: tuple[str, ...] = ("L",)
    # fault injection for tests: (role, epoch, step) at which that party exits abruptly
    fail_at: tuple[str, int, int] | None = None

    @property
    def rate(self) -> float:
        return DEFAULT_LR[self.model] if self.lr is None else self.lr

    def fingerprint(self) -> str:
        """What defines the training run (checkpoints of another run are refused)."""
        keys = ("model", "limit", "dataset", "batch", "momentum", "pool", "seed", "frac_bits", "softmax_steps",
                "blobs")
        d = {k: getattr(self, k) for k in keys}
        d["lr"] = self.rate
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def run_digest(self) -> str:
        """What the three parties must agree on before a run starts (compared between them): the checkpoint
        fingerprint and everything else that shapes the protocol's messages."""
        keys = ("sign_bits", "drelu", "chunk", "preprocess", "reveal_to", "owners", "examples")
        d = {k: getattr(self, k) for k in keys}
        d["fingerprint"] = self.fingerprint()
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def validate(self) -> None:
        if self.model not in MODELS:
            raise AloeError(f"unknown model {self.model!r} (one of {', '.join(MODELS)})")
        if self.pool not in POOLS:
            raise AloeError(f"unknown pooling {self.pool!r} (max or avg)")
        if self.epochs < 1:
            raise AloeError("--epochs must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise AloeError("--limit must be positive")
        if self.batch < 1:
            raise AloeError("--batch must be positive")
        if not self.frac_bits + 2 <= self.sign_bits <= COMPARE_BITS:
            raise AloeError(f"--sign-bits must be in [{self.frac_bits + 2}, {COMPARE_BITS}] (frac bits + 2 to 63)")
        if self.drelu not in DRELU_METHODS:
            raise AloeError(f"unknown DReLU method {self.drelu!r} (one of {', '.join(DRELU_METHODS)})")
        if self.softmax_steps < 1 or self.softmax_steps & (self.softmax_steps - 1):
            raise AloeError("--softmax-steps must be a power of two")
        if self.wan is not None:
            profile(self.wan)
        if not self.reveal_to or any(r not in ("L", "R") for r in self.reveal_to):
            raise AloeError("the model is revealed to L and/or R")
        if self.dataset == "owners" and (self.model != "lr" or not self.owners or not self.examples):
            raise AloeError("data from owners needs model lr, the owners' columns and the number of examples")
        quantize_rate(self.rate / self.batch)


def batch_size(cfg: TrainConfig, n: int) -> int:
    return min(cfg.batch, n)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The public example order of an epoch (both parties and the plain baseline use it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def plain_features(cfg: TrainConfig, lay: D.Layout) -> int:
    return lay.l_shape[0] + lay.r_shape[0] if cfg.model == "lr" else 784


# ---------------------------------------------------------------- checkpoints (each party: what it alone holds)

ROLE_NAMES = {"L": "L", "R": "R", "D": "the dealer"}


def _ckpt_dir(cfg: TrainConfig, role: str) -> Path:
    base = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else cache_root() / "mpc-train" / cfg.fingerprint()
    return base / role


def _atomic_save(path: Path, obj) -> None:
    """``torch.save`` through a temporary file (mode 0600) and a rename: a reader never sees a half-written file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hash_into(h, value) -> None:
    if isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value):
            h.update(repr(k).encode() + b":")
            _hash_into(h, value[k])
        h.update(b"}")
    elif isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(value).encode() + b";")


def content_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's content (everything but the digest itself): a file edited or damaged after it was
    written no longer matches."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def data_digest(*tensors) -> str | None:
    """SHA-256 of a party's own data (a resumed epoch replays its randomness, which is safe only on the same data)."""
    if not tensors:
        return None
    h = hashlib.sha256()
    for t in tensors:
        arr = t.detach().contiguous().numpy()
        h.update(f"{arr.dtype} {arr.shape}".encode())
        h.update(arr)
    return h.hexdigest()


def key_digest(key: bytes) -> str:
    return hashlib.sha256(b"aloe mpc PRF key " + key).hexdigest()


@dataclass(frozen=True)
class RunState:
    """What ties a party's checkpoints to one run: the run id (drawn by the dealer at a fresh start), the PRF keys
    (the dealer: both; L and R: their own) and this party's data digest."""

    run_id: int
    keys: dict
    data: str | None = None


def _save_checkpoint(cfg: TrainConfig, role: str, epoch: int, net, opt: SGD | None, run: RunState) -> None:
    d = _ckpt_dir(cfg, role)
    d.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": cfg.fingerprint(), "role": role, "epoch": epoch, "run_id": run.run_id}
    if role == "D":
        state["keys"] = {who: key.hex() for who, key in run.keys.items()}
    else:
        state.update(key_digest=key_digest(run.keys[role]), data_digest=run.data,
                     shares={q.name: q.share for q in net.params}, momentum=opt.state())
    state["digest"] = content_digest(state)
    _atomic_save(d / f"epoch-{epoch:04d}.pt", state)
    # files of later epochs are left from another run (this one just reached ``epoch``); L and R keep the last
    # KEEP_CHECKPOINTS, the dealer (a few hundred bytes each, and it may run epochs ahead of L and R) keeps all
    for e, path in _available(cfg, role).items():
        if e > epoch or (role != "D" and e <= epoch - KEEP_CHECKPOINTS):
            path.unlink(missing_ok=True)


def _available(cfg: TrainConfig, role: str) -> dict[int, Path]:
    out = {}
    for path in _ckpt_dir(cfg, role).glob("epoch-*.pt"):
        try:
            out[int(path.stem.split("-")[1])] = path
        except ValueError:
            continue
    return out


def read_checkpoints(cfg: TrainConfig, role: str, data: str | None = None) -> dict[int, dict]:
    """Party ``role``'s checkpoints of epochs 1 to ``cfg.epochs``, each checked: this configuration, this role, the
    epoch its name says, its content digest, and (L and R) the data this party holds now."""
    out = {}
    for epoch, path in sorted(_available(cfg, role).items()):
        if not 0 < epoch <= cfg.epochs:
            continue
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise AloeError(f"checkpoint {path} cannot be read (damaged?): {type(exc).__name__}") from None
        if not isinstance(state, dict) or state.get("fingerprint") != cfg.fingerprint():
            got = state.get("fingerprint") if isinstance(state, dict) else None
            raise AloeError(f"checkpoint {path} belongs to another training run (configuration digest {got}, this "
                            f"run's {cfg.fingerprint()})")
        if state.get("role") != role:
            raise AloeError(f"checkpoint {path} is {ROLE_NAMES.get(state.get('role'), state.get('role'))}'s, not "
                            f"{ROLE_NAMES[role]}'s")
        if state.get("epoch") != epoch:
            raise AloeError(f"checkpoint {path} holds epoch {state.get('epoch')}, its name says {epoch}")
        if state.get("digest") != content_digest(state) or not isinstance(state.get("run_id"), int):
            raise AloeError(f"checkpoint {path} was modified or is damaged (its content digest does not match)")
        if role != "D" and data is not None and state.get("data_digest") not in (None, data):
            raise AloeError(f"checkpoint {path} was written with other data than this party holds now (resuming "
                            "would replay the run's randomness on other data); restore that data or start afresh")
        out[epoch] = state
    return out


def resume_epoch(epochs: int, runs: dict[str, list[int]]) -> int:
    """The epoch a resumed run starts from, given each role's run id per epoch (``runs[role][e]``, 0: no
    checkpoint of epoch ``e``; index 0 unused): the last epoch all three checkpointed in the same run; 0 when no
    party holds any. Raises :class:`AloeError` when the three do not fit together."""
    held = {r: {e: ids[e] for e in range(1, epochs + 1) if ids[e]} for r, ids in runs.items()}

    def who(roles) -> str:
        names = [ROLE_NAMES[r] for r in roles]
        return " and ".join(names) if len(names) < 3 else f"{names[0]}, {names[1]} and {names[2]}"

    def span(es) -> str:
        return ", ".join(str(e) for e in sorted(es))

    if not any(held.values()):
        return 0
    for e in range(1, epochs + 1):
        ids = {r: h[e] for r, h in held.items() if e in h}
        if len(set(ids.values())) > 1:
            detail = ", ".join(f"{ROLE_NAMES[r]}: run {i:x}" for r, i in ids.items())
            raise AloeError(f"resume: the checkpoints of epoch {e} belong to different runs ({detail}); give every "
                            "party the checkpoints of one run")
    empty = [r for r in ("L", "R", "D") if not held[r]]
    if empty:
        full = [r for r in ("L", "R", "D") if held[r]]
        raise AloeError(f"resume: {who(empty)} {'holds' if len(empty) == 1 else 'hold'} no checkpoint while "
                        f"{who(full)} {'holds' if len(full) == 1 else 'hold'} epochs "
                        f"{'; '.join(span(held[r]) for r in full)}; give every party its checkpoint directory")
    common = set(held["L"]) & set(held["R"]) & set(held["D"])
    if not common:
        detail = "; ".join(f"{ROLE_NAMES[r]}: {span(held[r])}" for r in ("L", "R", "D"))
        raise AloeError(f"resume: no epoch is checkpointed by all three parties ({detail})")
    return max(common)


def _digest_int(hexdigest: str) -> int:
    return int(hexdigest[:15], 16)


def _agree_start(party: Party, cfg: TrainConfig, lay: D.Layout, data: str | None) -> tuple[int, RunState, dict]:
    """Before any computation: the three parties check they run the same configuration, agree on the epoch to
    start from (:func:`resume_epoch`; 0 without ``resume``) and on the run (a fresh run id and the keys just drawn,
    or those of the checkpoints). Returns (start epoch, this party's run state, its checkpoint of that epoch)."""
    mine = read_checkpoints(cfg, party.role, data) if cfg.resume else {}
    head = torch.tensor([_digest_int(cfg.run_digest()), cfg.epochs, lay.n])
    ids = torch.tensor([0] + [mine[e]["run_id"] if e in mine else 0 for e in range(1, cfg.epochs + 1)])
    if party.is_dealer:
        for who in ("L", "R"):
            party._dealer_send(who, [(head, 0)])
            party._dealer_send(who, [(ids, 0)])
        _, (start,), n = party.dealer_links["L"].recv([((1,), 0)])
        party.stats.offline.bytes_received += n
        start = int(start)
        if start:
            run = RunState(mine[start]["run_id"], {w: bytes.fromhex(k) for w, k in mine[start]["keys"].items()})
        else:
            run = RunState(secrets.randbits(62) + 1, dict(party.keys))
        for who in ("L", "R"):
            party._dealer_send(who, [(torch.tensor([run.run_id]), 0),
                                     (torch.tensor(list(run.keys[who]), dtype=torch.int64), 256)])
        party.keys = dict(run.keys)
        return start, run, mine.get(start, {})
    other = "R" if party.role == "L" else "L"
    heads = {"D": party._dealer_recv([((3,), 0)])[0]}
    (heads[other],) = party.exchange([(head, 0)])
    names = {"D": "the dealer", other: other}
    for who, h in heads.items():
        if int(h[0]) != int(head[0]):
            raise AloeError(f"the parties run different training configurations ({names[who]}'s digest "
                            f"{int(h[0]):x}, {party.role}'s {int(head[0]):x}): give every party the same [train] table")
        if int(h[1]) != cfg.epochs or int(h[2]) != lay.n:
            raise AloeError(f"{names[who]} trains {int(h[1])} epochs on {int(h[2])} examples, {party.role} "
                            f"{cfg.epochs} on {lay.n}: give every party the same [train] table")
    runs = {party.role: ids.tolist(), "D": party._dealer_recv([((cfg.epochs + 1,), 0)])[0].tolist()}
    (theirs,) = party.exchange([(ids, 0)])
    runs[other] = theirs.tolist()
    start = resume_epoch(cfg.epochs, runs)
    if party.role == "L":
        party.stats.offline.bytes_sent += party.dealer_links["D"].send(0, [(torch.tensor([start]), 0)])
    run_id, key = party._dealer_recv([((1,), 0), ((16,), 256)])
    key = bytes(key.tolist())
    state = mine.get(start, {})
    if start and (int(run_id[0]) != state["run_id"] or key_digest(key) != state["key_digest"]):
        raise AloeError(f"the dealer's checkpoint of epoch {start} holds another PRF key than {party.role}'s "
                        f"({_ckpt_dir(cfg, party.role)}): the dealer's checkpoints are of another run")
    party.keys = {party.role: key}
    return start, RunState(int(run_id[0]), dict(party.keys), data), state


def _load_checkpoint(state: dict, net) -> None:
    for q in net.params:
        q.share = state["shares"][q.name]
        q.momentum = state["momentum"][q.name]


# ---------------------------------------------------------------- the parties' program


def _share_batch(party: Party, cfg: TrainConfig, lay: D.Layout, own_x, own_y, idx: torch.Tensor):
    b = idx.shape[0]
    mine = party.role

    def take(t):
        return None if t is None else t[idx]

    if cfg.dataset == "owners":  # own_x, own_y: this party's shares of the owners' columns and labels
        if party.is_dealer:
            return SharedTensor(party, meta((b, *lay.l_shape))), SharedTensor(party, meta((b, 1)))
        return SharedTensor.from_shares(party, own_x[idx]), SharedTensor.from_shares(party, own_y[idx])
    # the features stay with their owners: the first layer masks and opens each owner's block from its side alone
    if cfg.model == "lr":
        x = OwnedInput.from_blocks(party, [("L", take(own_x) if mine == "L" else None, (b, *lay.l_shape)),
                                           ("R", take(own_x) if mine == "R" else None, (b, *lay.r_shape))])
        y = SharedTensor.from_private(party, take(own_y).unsqueeze(1) if mine == "R" else None, "R", (b, 1))
        return x, y
    x = OwnedInput.from_blocks(party, [("L", take(own_x) if mine == "L" else None, (b, *lay.l_shape))])
    onehot = None
    if mine == "R":
        onehot = torch.nn.functional.one_hot(take(own_y), lay.classes).double()
    y = SharedTensor.from_private(party, onehot, "R", (b, lay.classes))
    return x, y


def _warm_up() -> None:
    """Run the shape-only (``meta``) operations once: their first use imports large parts of torch (dynamo, sympy;
    seconds per process), a start-up cost that must not land inside the first training step."""
    from aloe.mpc.triples import conv2d_maps, meta

    a, w = meta((2, 1, 6, 6)), meta((1, 1, 3, 3))
    maps = conv2d_maps((2, 1, 6, 6), (1, 1, 3, 3))
    maps.g1(w, maps.f(a, w))
    maps.g2(maps.f(a, w), a)
    torch.cat([meta((2, 3)), meta((2, 3))], 1) @ meta((6, 1))
    torch.cat([torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)], 1).sum(0)
    sigmoid_coefficients()  # a least-squares fit, cached after the first call
    kernels.warm_up()  # compiled kernels: loaded from numba's on-disk cache (compiled on the very first run)


def train_program(party: Party, cfg: TrainConfig, lay: D.Layout, progress) -> dict | None:
    """One party's training run. ``lay`` holds the public facts about the data (count, feature shapes); the dealer
    reads no data at all."""
    torch.set_num_threads(1)
    _warm_up()
    if cfg.wan:
        shape_links(party, cfg.wan)
    own_x, own_y = D.party_data(party.role, cfg.model, cfg.dataset, cfg.limit, cfg.seed, cfg.blobs, cfg.data_dir)
    if cfg.dataset == "owners" and not party.is_dealer:
        from aloe.mpc.owners import receive_shares

        own_x, own_y = receive_shares(party, cfg.owners, cfg.examples, lay.n)
    plain = plain_model(cfg.model, features=plain_features(cfg, lay), pool=cfg.pool, seed=cfg.seed)
    net = secure_model(party, plain, chunk=cfg.chunk, sign_bits=cfg.sign_bits, drelu=cfg.drelu)
    bsz = batch_size(cfg, lay.n)
    opt = SGD(party, net.params, cfg.rate, bsz, cfg.momentum)
    # the dealer holds no data; the owners' shares are fresh masks each time they share
    mine_data = None if party.is_dealer or cfg.dataset == "owners" else \
        data_digest(*(t for t in (own_x, own_y) if t is not None))
    start, run, state = _agree_start(party, cfg, lay, mine_data)
    if start and not party.is_dealer:
        _load_checkpoint(state, net)
    steps = lay.n // bsz
    party.sync()
    t0 = time.perf_counter()
    depth0 = party.stats.depth
    checkpoint_seconds = 0.0
    online_seconds = 0.0
    step_seconds: list[float] = []
    for epoch in range(start, cfg.epochs):
        order = epoch_order(lay.n, cfg.seed, epoch)
        party.rekey(epoch)
        for step in range(steps):
            if cfg.fail_at is not None and cfg.fail_at == (party.role, epoch, step):
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: killed, nothing closed or flushed
            if cfg.preprocess and not party.is_dealer:
                party.dealer_sync()  # wait until the dealer has sent everything this step needs
            s0 = time.perf_counter()
            x, y = _share_batch(party, cfg, lay, own_x, own_y, order[step * bsz:(step + 1) * bsz])
            logits = net.forward(x)
            if cfg.model == "lr":
                grad = sigmoid_bce_grad(logits, y, drelu=cfg.drelu)
            else:
                grad = softmax_ce_grad(logits, y, steps=cfg.softmax_steps)
            net.backward(grad)
            opt.step()
            step_seconds.append(time.perf_counter() - s0)
            online_seconds += step_seconds[-1]
            if cfg.preprocess and party.is_dealer:
                party.dealer_sync()
            if progress is not None and party.role == "L":
                progress.put((epoch, step + 1, steps))
        t1 = time.perf_counter()
        _save_checkpoint(cfg, party.role, epoch + 1, net, opt, run)
        checkpoint_seconds += time.perf_counter() - t1
    train_seconds = time.perf_counter() - t0
    rounds = party.stats.depth - depth0
    weights = {}
    both = set(cfg.reveal_to) == {"L", "R"}
    for q in net.params:
        v = q.tensor().reveal(to=None if both else cfg.reveal_to[0])
        if party.role in cfg.reveal_to:
            # numpy, not torch: torch's pickling of tensors between processes would pass shared-memory handles
            # that die with this process
            weights[q.name] = v.numpy()
    if party.role == "L":
        return {"weights": weights or None, "start_epoch": start, "train_seconds": train_seconds, "rounds": rounds,
                "checkpoint_seconds": checkpoint_seconds,
                "online_seconds": online_seconds if cfg.preprocess else None,
                "steps_per_epoch": steps, "step_seconds": step_seconds}
    return {"start_epoch": start, "weights": weights or None} if party.role == "R" else None


# ---------------------------------------------------------------- plain baseline and evaluation


def compare_input_range(cfg: TrainConfig) -> float:
    """The largest absolute value a secure ReLU input (or a max-pool difference) may take for the sign read at
    ``cfg.sign_bits`` to be exact."""
    return float(2 ** (cfg.sign_bits - cfg.frac_bits))


def train_plain(cfg: TrainConfig, observed: dict | None = None) -> nn.Sequential:
    """The same model in plain PyTorch: same data, initialisation, batch order, momentum and (quantised) rate.

    ``observed``, if given, receives ``compare_input_max``: the largest absolute value that a secure compare's input
    would take during training, the figure to hold against :func:`compare_input_range`. That is a ReLU input, or
    twice it where the ReLU feeds a max-pool: the secure model pools first, so its compares see differences of
    those inputs (pre-activations, negative ones included)."""
    torch.set_num_threads(1)
    lay = D.layout(cfg.model, cfg.dataset, cfg.limit, cfg.blobs)
    xl, _ = D.party_data("L", cfg.model, cfg.dataset, cfg.limit, cfg.seed, cfg.blobs)
    xr, y = D.party_data("R", cfg.model, cfg.dataset, cfg.limit, cfg.seed, cfg.blobs)
    x = torch.cat([xl, xr], 1) if cfg.model == "lr" else xl
    model = plain_model(cfg.model, features=plain_features(cfg, lay), pool=cfg.pool, seed=cfg.seed)
    bsz = batch_size(cfg, lay.n)
    rate = quantize_rate(cfg.rate / bsz).value * bsz
    opt = torch.optim.SGD(model.parameters(), lr=rate, momentum=cfg.momentum)
    loss_fn = nn.BCEWithLogitsLoss() if cfg.model == "lr" else nn.CrossEntropyLoss()
    peak = [0.0]

    def watch(factor: float):
        def hook(_module, inputs):
            peak[0] = max(peak[0], factor * float(inputs[0].detach().abs().max()))
        return hook

    mods = list(model)
    for i, m in enumerate(mods):
        if isinstance(m, nn.ReLU):
            pooled = i + 1 < len(mods) and isinstance(mods[i + 1], nn.MaxPool2d)
            m.register_forward_pre_hook(watch(2.0 if pooled else 1.0))
        elif isinstance(m, nn.MaxPool2d):
            m.register_forward_pre_hook(watch(2.0))
    for epoch in range(cfg.epochs):
        order = epoch_order(lay.n, cfg.seed, epoch)
        for step in range(lay.n // bsz):
            idx = order[step * bsz:(step + 1) * bsz]
            out = model(x[idx])
            target = y[idx].unsqueeze(1) if cfg.model == "lr" else y[idx]
            loss = loss_fn(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if observed is not None:
        observed["compare_input_max"] = peak[0]
    return model


@torch.no_grad()
def accuracy(cfg: TrainConfig, model: nn.Sequential) -> float:
    x, y = D.test_data(cfg.model, cfg.dataset, cfg.seed, cfg.test_limit, cfg.blobs)
    out = model(x)
    pred = (out.squeeze(1) > 0).float() if cfg.model == "lr" else out.argmax(1)
    return float((pred == y).float().mean())


# ---------------------------------------------------------------- launcher


def write_model(path: Path, weights: dict, info: dict) -> None:
    _atomic_save(path, {"weights": weights, "meta": info})


def train(cfg: TrainConfig, *, progress: bool = True, out: Path | None = None, plain: bool = True) -> dict:
    """Run secure training with three processes, then the plain baseline; return the report."""
    cfg.validate()
    if cfg.checkpoint_dir is None:
        cfg = replace(cfg, checkpoint_dir=str(cache_root() / "mpc-train" / cfg.fingerprint()))
    lay = D.layout(cfg.model, cfg.dataset, cfg.limit, cfg.blobs)
    bsz = batch_size(cfg, lay.n)
    steps = lay.n // bsz
    ctx = mp.get_context("spawn")
    q = ctx.Queue() if progress else None
    box: dict = {}

    def launch() -> None:
        try:
            box["result"] = run_processes(train_program, cfg, lay, q, frac_bits=cfg.frac_bits, timeout=cfg.timeout,
                                          return_stats=True, certs=cfg.certs,
                                          insecure_loopback=cfg.insecure_loopback)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    t0 = time.perf_counter()
    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * cfg.epochs, desc=f"mpc train {cfg.model}", unit="step")
        done = 0
        while thread.is_alive():
            try:
                epoch, step, _ = q.get(timeout=0.5)
            except queue.Empty:
                continue
            now = epoch * steps + step
            bar.update(max(0, now - done))
            done = max(done, now)
        bar.close()
    thread.join()
    seconds = time.perf_counter() - t0
    if "error" in box:
        err = box["error"]
        raise err if isinstance(err, AloeError) else AloeError(f"secure training failed: {err}")
    results, stats = box["result"]
    res_l = results["L"]
    online = stats["L"]["online_bytes_sent"] + stats["R"]["online_bytes_sent"]
    offline = sum(stats[r]["offline_bytes_sent"] for r in ("L", "R", "D"))
    secure = load_weights(plain_model(cfg.model, features=plain_features(cfg, lay), pool=cfg.pool, seed=cfg.seed),
                          res_l["weights"])
    report = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "pool": cfg.pool if cfg.model in ("b", "c") else None,
        "examples": lay.n,
        "epochs": cfg.epochs,
        "start_epoch": res_l["start_epoch"],
        "batch": bsz,
        "steps_per_epoch": steps,
        "lr": cfg.rate,
        "lr_quantized": quantize_rate(cfg.rate / bsz).value * bsz,
        "momentum": cfg.momentum,
        "frac_bits": cfg.frac_bits,
        "wan": cfg.wan,
        "accuracy": accuracy(cfg, secure),
        "seconds": seconds,
        "train_seconds": res_l["train_seconds"],
        "checkpoint_seconds": res_l["checkpoint_seconds"],
        "online_seconds": res_l["online_seconds"],
        "step_seconds": res_l["step_seconds"],
        "online_bytes": online,
        "offline_bytes": offline,
        "rounds": res_l["rounds"],
        "checkpoint_dir": cfg.checkpoint_dir,
        "config": {k: v for k, v in asdict(cfg).items() if k != "fail_at"},
    }
    report["sign_bits"] = cfg.sign_bits
    report["drelu"] = cfg.drelu
    report["compare_input_range"] = compare_input_range(cfg)
    if plain:
        observed: dict = {}
        report["plain_accuracy"] = accuracy(cfg, train_plain(cfg, observed))
        report["plain_compare_input_max"] = observed["compare_input_max"]
        if observed["compare_input_max"] >= report["compare_input_range"]:
            print(f"warning: the plain run's ReLU/max-pool inputs reached {observed['compare_input_max']:.4g}, "
                  f"beyond the {report['compare_input_range']:.4g} that --sign-bits {cfg.sign_bits} reads exactly; "
                  "rerun with a larger --sign-bits", file=sys.stderr)
    if out is not None:
        weights = {k: torch.from_numpy(v) for k, v in res_l["weights"].items()}
        write_model(Path(out), weights, {k: report[k] for k in ("model", "epochs", "accuracy")})
        report["model_path"] = str(out)
    return report
