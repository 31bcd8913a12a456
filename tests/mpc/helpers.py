"""Helpers for the MPC tests: share a plaintext inside a program and reveal raw shares."""

import torch

from aloe.mpc.triples import meta


def share_raw(party, x: torch.Tensor) -> torch.Tensor:
    """Additive shares of int64 ``x`` for tests only: the mask comes from torch's generator, which is fine for test
    data but not for real secrets (real inputs go through ``SharedTensor.from_private``)."""
    if party.is_dealer:
        return meta(tuple(x.shape))
    # both parties need the same mask here, so L draws it and sends it (counted like any message)
    if party.role == "L":
        r = torch.randint(-(2**63), 2**63 - 1, x.shape, dtype=torch.int64)
        party.send_peer([(r, 0)])
        return x - r
    (r,) = party.recv_peer([(tuple(x.shape), 0)])
    return r


def reveal_raw(party, v: torch.Tensor, m: int = 0):
    if party.is_dealer:
        return None
    (o,) = party.exchange([(v, m)])
    if m == 0:
        return v + o
    if m == 2:
        return (v.to(torch.int64) ^ o.to(torch.int64))
    return (v.to(torch.int64) + o.to(torch.int64)) % m
