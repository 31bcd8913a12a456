"""Inputs from their owners: ``aloe mpc share --role owner --name NAME --config deploy.toml --data FILE``.

A data owner reads only its own file (CSV or ``.npy``: ``examples`` rows of its ``columns`` features, and the label
as a last column if it owns the labels), encodes it in fixed point and splits it in its own process: it draws a
fresh AES key with :mod:`secrets`, sends the key to R (who expands its share ``r`` from it) and ``x - r`` to L, over
TLS channels authenticated by the owner's certificate. L and R each hold a uniformly random share; neither reads
any file, and the dealer sees nothing of the data. L and R acknowledge, so the owner exits only once both hold
their shares. The shapes (rows, columns, who has the labels) are public and named in the deployment file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from aloe import AloeError
from aloe.mpc.dealer import KEY_BYTES, PRG, new_key
from aloe.mpc.ring import FixedPoint, check_encodable
from aloe.mpc.tls import owner_role

_ACK = [((1,), 2)]


def read_file(path: Path, rows: int, columns: int, labels: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",",
                                                                                          ndmin=2)
    except (OSError, ValueError) as exc:
        raise AloeError(f"cannot read {path}: {exc}") from None
    want = columns + (1 if labels else 0)
    if arr.ndim != 2 or arr.shape != (rows, want):
        raise AloeError(f"{path} holds a {'x'.join(map(str, arr.shape))} table, the deployment says {rows}x{want} "
                        f"({columns} columns{' + the label' if labels else ''})")
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    if not torch.isfinite(t).all():
        raise AloeError(f"{path} holds values that are not finite numbers")
    if not labels:
        return t, None
    y = t[:, -1:]
    if not ((y == 0) | (y == 1)).all():
        raise AloeError(f"the labels (last column of {path}) must be 0 or 1")
    return t[:, :-1].contiguous(), y.contiguous()


def share_file(dep, name: str | None, data: Path) -> dict:
    """The owner's side: read ``data``, split it, send the shares to L and R, wait for both to acknowledge."""
    from aloe.mpc.party import _connect, _endpoint, _hello

    spec = dep.owner(name)
    role = owner_role(spec.name)
    frac_bits = int(dep.train.get("frac_bits", 14))
    x, y = read_file(data, dep.examples, spec.columns, spec.labels)
    fp = FixedPoint(frac_bits)
    check_encodable(x, fp, what=f"{data}")
    sec = dep.security(role, spec.cert, spec.key)
    key = new_key()
    prg = PRG(key)
    mask_x = prg.int64(tuple(x.shape))
    items = [(fp.encode(x) - mask_x, 0)]
    if y is not None:
        items.append((fp.encode(y) - prg.int64(tuple(y.shape)), 0))
    links = {}
    try:
        for who in ("L", "R"):
            cs = _connect(dep.parties[who].address, sec, dep.timeout, who)
            _hello(cs[0], role)
            links[who] = _endpoint(cs, who, dep.timeout)
        links["L"].send(0, items)
        links["R"].send(0, [(torch.tensor(list(key), dtype=torch.int64), 256)])
        for who in ("L", "R"):
            links[who].recv(_ACK)
    finally:
        for ep in links.values():
            ep.close()
    return {"owner": spec.name, "rows": int(x.shape[0]), "columns": int(x.shape[1]), "labels": y is not None,
            "sent_to": ["L", "R"]}


def receive_shares(party, owners: tuple, examples: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L's or R's side: each owner's share of its columns (in the deployment's order) and of the labels; the first
    ``n`` rows are used."""
    xs, y = [], None
    for name, columns, labels in owners:
        ep = party.owner_links[owner_role(name)]
        if party.role == "L":
            expect = [((examples, columns), 0)] + ([((examples, 1), 0)] if labels else [])
            _, got, _ = ep.recv(expect)
        else:
            _, (key,), _ = ep.recv([((KEY_BYTES,), 256)])
            prg = PRG(bytes(key.tolist()))
            got = [prg.int64((examples, columns))] + ([prg.int64((examples, 1))] if labels else [])
        ep.send(0, [(torch.ones(1, dtype=torch.int64), 2)])
        xs.append(got[0])
        if labels:
            y = got[1]
    return torch.cat(xs, 1)[:n], y[:n]
