"""VMA, vocabulary matching (Thomas et al.; design notes section 4).

Every pair of published obfuscated weights whose product cancels the key (P Q = I) is a plain product with its rows
and columns permuted: ``Pi X Z``. Sorting a row removes the column permutation Z, so a token's sorted row in the
obfuscated product matches its sorted row in the plain product. Pairs used, per layer where they exist:

- embed x head (rows: tokens through the embedding; columns: tokens through the head),
- per-head q-k: ``(E W_q^(i)) (E W_k^(g))^T`` (heads pooled, so the head permutation does not matter),
- gate and up: ``E W_gate``, ``E W_up`` (columns permuted by Z_ffn, up also scaled),
- down x head: ``W_down W_head^T`` (tokens are its columns).

To run on the whole 49,152-token vocabulary on two cores, each row is sorted over a uniform random subset of its
columns (``budget.columns``: a uniform subset of a permuted set is a uniform subset of the plain set, so the
evenly spaced order statistics estimate the same row quantiles on both sides), the attacker imitates the
artifact's public noise level on its plain weights, and each column is first divided by its RMS over the tokens,
which removes the secret per-unit scales (H_ffn on up and down) however wide their range. The per-pair signatures
are standardised and concatenated, so the squared distance is the sum of the per-pair distances: a soft vote over
pairs and layers. Matching is exact nearest neighbour over the full vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from aloe.attacks.common import Target, column_normalise, nearest, pca_project, row_quantiles, standardise
from aloe.attacks.scoring import IdGuess


def _pick(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    return torch.as_tensor(rng.choice(n, size=min(k, n), replace=False))


def signatures(t: Target, q_ids: np.ndarray, progress=None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                        list[str]]:
    """Per-pair row signatures of every plain token and of the attacked obfuscated ids. Where the server holds only
    the embedding rows it was sent (client-held vocabulary), the pairs that need the LM head are skipped, key-side
    samples are drawn from the held rows (and, on the plain side, from the prior's tokens), and column statistics
    come from those two populations."""
    P, (O,), names = view_signatures(t, [(t, q_ids)], progress)
    return P, O, names


def _qk(Wq: torch.Tensor, Wk: torch.Tensor, S: torch.Tensor, n_heads: int, hd: int, G: int) -> torch.Tensor:
    """``[W_q^(i)T W_k^(g) S^T]`` for every query head i (its KV head g), heads side by side."""
    return torch.cat([Wq[i * hd:(i + 1) * hd].T @ (Wk[(i // G) * hd:(i // G + 1) * hd] @ S.T) for i in range(n_heads)],
                     1)


class _Side(NamedTuple):
    v: Target              # the artifact
    Eq: torch.Tensor       # its embedding rows of the signed ids
    Hq: torch.Tensor       # its head rows of the signed ids
    held_ids: torch.Tensor  # the rows it holds
    held_q: torch.Tensor   # which signed ids it holds


def view_signatures(t: Target, views: list[tuple[Target, np.ndarray]], progress=None, plain_noise: bool = True
                    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], list[str]]:
    """The signatures of :func:`signatures` for several artifacts of the same plain model at once: the plain side is
    ``t``'s (noised as its profile says, or noise-free with ``plain_noise=False``), and each view ``(target, ids)``
    signs the rows ``ids`` of its own artifact the same way (the victim's, or an attacker's own copy). The first
    view draws its column samples from the same stream as :func:`signatures` (so its signatures are the same);
    the others from a second stream. Returns the plain blocks, the blocks of each view, and the pair names."""
    b, a = t.budget, t.arch
    rng, rng_more = b.rng("vma"), b.rng("vma-views")
    K, Q, n = b.columns, b.quantiles, a.vocab
    prof = t.profile
    E = t.noised_plain(t.plain_embed, float(prof.get("alpha_e", 0.0)) if plain_noise else 0.0, "vma-e")
    H = t.noised_plain(t.plain_head, float(prof.get("alpha_h", 0.0)) if plain_noise else 0.0, "vma-h")
    pop = t.plain_population
    pop_ids = pop.nonzero()[:, 0]
    sides = []
    for v, ids in views:
        qi, held = torch.as_tensor(ids), v.held_rows
        sides.append(_Side(v, v.obf_embed[qi], v.obf_head[qi], held.nonzero()[:, 0], held[qi]))
    head_held = all(v.head_held for v, _ in views)
    P, O, names = [], [[] for _ in views], []

    def pick(i, size, k):  # the column sample of view i
        return _pick(rng if i == 0 else rng_more, size, k)

    def add(name, fp, fos):
        for i, fo in enumerate(fos):
            p, o = standardise(fp, fo)
            O[i].append(o)
        P.append(p)
        names.append(name)

    if head_held:
        add("embed-head/rows", row_quantiles(E @ H[_pick(rng, n, K)].T, Q),
            [row_quantiles(s.Eq @ s.v.obf_head[pick(i, n, K)].T, Q) for i, s in enumerate(sides)])
        add("embed-head/cols", row_quantiles(H @ E[_pick(rng, n, K)].T, Q),
            [row_quantiles(s.Hq @ s.v.obf_embed[pick(i, n, K)].T, Q) for i, s in enumerate(sides)])
    hd, G = a.head_dim, a.n_heads // a.n_kv
    Kh = max(4, K // a.n_heads)
    for layer in t.layer_subset():
        # q-k per head, heads pooled: rows of (E W_q^(i)) (E_S W_k^(g))^T = E [W_q^(i)T W_k^(g) E_S^T]
        Mp = _qk(t.plain_layer(layer, "self_attn.q_proj"), t.plain_layer(layer, "self_attn.k_proj"),
                 E[pop_ids[_pick(rng, len(pop_ids), Kh)]], a.n_heads, hd, G)
        add(f"L{layer}/qk", row_quantiles(E @ Mp, Q),
            [row_quantiles(s.Eq @ _qk(s.v.obf_layer(layer, "self_attn.q_proj"),
                                      s.v.obf_layer(layer, "self_attn.k_proj"),
                                      s.v.obf_embed[s.held_ids[pick(i, len(s.held_ids), Kh)]], a.n_heads, hd, G), Q)
             for i, s in enumerate(sides)])
        for proj in ("gate", "up"):
            Wp = t.plain_layer(layer, f"mlp.{proj}_proj")
            up = _pick(rng, a.ffn, K)
            add(f"L{layer}/{proj}", row_quantiles(column_normalise(E @ Wp[up].T, pop), Q),
                [row_quantiles(column_normalise(s.Eq @ s.v.obf_layer(layer, f"mlp.{proj}_proj")[pick(i, a.ffn, K)].T,
                                                s.held_q), Q) for i, s in enumerate(sides)])
        if head_held:
            Wd = t.plain_layer(layer, "mlp.down_proj")
            up = _pick(rng, a.ffn, K)
            add(f"L{layer}/down-head", row_quantiles(column_normalise(H @ Wd[:, up]), Q),
                [row_quantiles(column_normalise(s.Hq @ s.v.obf_layer(layer, "mlp.down_proj")[:, pick(i, a.ffn, K)]),
                               Q) for i, s in enumerate(sides)])
        if progress is not None:
            progress.update(1)
    return P, O, names


def match(P: list[torch.Tensor], O: list[torch.Tensor], k: int, dim: int = 128) -> torch.Tensor:
    p, o = pca_project(torch.cat(P, 1), torch.cat(O, 1), dim)
    return nearest(o, p, k)


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None) -> IdGuess:
    q_ids, uniform = t.query_ids(must=received)
    if not bool(t.held_rows.any()):  # the client holds both tables and sent nothing yet: nothing to match
        return IdGuess(q_ids, -np.ones((len(q_ids), t.budget.topk), dtype=np.int64), uniform=uniform)
    P, O, names = signatures(t, q_ids, progress)
    cand = t.no_claim_on_unheld(q_ids, match(P, O, t.budget.topk))
    extra = {"pairs": len(names), "layers": len(t.layer_subset()), "columns": t.budget.columns}
    if t.head_held:
        extra["embed_head_only_pred"] = nearest(torch.cat(O[:2], 1), torch.cat(P[:2], 1), 1)[:, 0].numpy()
    return IdGuess(q_ids, cand.numpy(), uniform=uniform, extra=extra)
