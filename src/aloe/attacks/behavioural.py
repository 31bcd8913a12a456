"""Behavioural matching: the server runs the model it hosts and matches behaviour, not weights.

Not in the paper. The obfuscated model computes (up to its noise) ``p~(. | a~) = tau o p(. | tau^-1 a~)``, so any
statistic of its output distributions that ignores the labels of the ids is shared with the plain model. Three
stages, all without the secret:

1. **Input side.** For each attacked obfuscated id, one forward pass on that single token; signature = the sorted
   top-``S`` log-probabilities and the entropy of the next-token distribution (label-free).
2. **Output side.** For ``R`` single-token contexts drawn uniformly (different ones on each side; they are the same
   population), the log-probability that each *output* id receives; signature of an output id = the mean, spread
   and order statistics of its column over the R contexts. This averages the input noise away and gives a
   signature for every id of the vocabulary, forwarded or not.
3. **Graph refinement, seeded.** The fixed special ids are anchors (identity). Each id is a node with out-edges to
   its top-``T`` next tokens (input side) and in-edges from the contexts that rank it in their top-``T`` (output
   side). Given the current mapping, each candidate (of the top ``C`` by signature) is re-scored by how many mapped
   neighbours it shares with the plain node; the mapping is updated and the scoring repeated (``rounds``).

The plain side is computed once per plain model and cached (it does not depend on the victim).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe.attacks.common import Target, nearest, standardise
from aloe.attacks.scoring import IdGuess

S_TOP = 32          # sorted log-probs kept in the input-side signature
T_EDGES = 16        # top next tokens kept as graph edges
OUT_Q = 8           # order statistics of an output id's column


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def single_token_pass(model, ids: np.ndarray, rows: np.ndarray, batch: int, desc: str, progress: bool):
    """Input-side signatures and top edges for ``ids``; full log-prob rows only for the ids in ``rows``."""
    n = int(model.config.vocab_size)
    sig = torch.zeros(len(ids), S_TOP + 1)
    edges = torch.zeros(len(ids), T_EDGES, dtype=torch.long)
    keep = np.isin(ids, rows)
    full = torch.zeros(int(keep.sum()), n, dtype=torch.float16)
    at = 0
    for s in tqdm(range(0, len(ids), batch), desc=desc, disable=not progress, unit="batch"):
        x = torch.as_tensor(ids[s:s + batch])[:, None]
        lp = torch.log_softmax(model(x).logits[:, -1].float(), -1)
        top = lp.topk(max(S_TOP, T_EDGES), dim=1)
        sig[s:s + len(x), :S_TOP] = top.values[:, :S_TOP]
        sig[s:s + len(x), S_TOP] = -(lp.exp() * lp).sum(1)
        edges[s:s + len(x)] = top.indices[:, :T_EDGES]
        m = torch.as_tensor(keep[s:s + batch])
        if m.any():
            full[at:at + int(m.sum())] = lp[m].half()
            at += int(m.sum())
    return sig, edges, full


def column_signature(full: torch.Tensor) -> torch.Tensor:
    """Per output id: mean, std and order statistics of its log-probability over the sampled contexts."""
    x = full.float()
    s, _ = torch.sort(x, dim=0)
    idx = torch.linspace(0, x.shape[0] - 1, OUT_Q).round().long()
    return torch.cat([x.mean(0, keepdim=True), x.std(0, keepdim=True), s[idx]], 0).T


def plain_side(t: Target, rows: int, progress: bool) -> dict:
    """Signatures of every plain id (cached per plain checkpoint and budget)."""
    from aloe.assets.cache import cache_root

    key = hashlib.sha256(f"{t._plain.fingerprint()}|{rows}|{S_TOP}|{T_EDGES}|{OUT_Q}|v1".encode()).hexdigest()[:20]
    path = cache_root() / "attacks" / f"behaviour-{key}.pt"
    if path.is_file():
        return torch.load(path)
    n = t.arch.vocab
    model = load_model(t.plain_dir)
    sample = np.sort(np.random.default_rng().choice(n, size=min(rows, n), replace=False))
    sig, edges, full = single_token_pass(model, np.arange(n), sample, t.budget.batch, "behaviour/plain", progress)
    out = {"sig": sig, "edges": edges, "col": column_signature(full)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def _in_edges(edges: torch.Tensor, src_ids: np.ndarray, n: int) -> list[set]:
    inc: list[set] = [set() for _ in range(n)]
    for s, row in zip(src_ids, edges.tolist()):
        for j in row:
            inc[j].add(int(s))
    return inc


def refine(cand: np.ndarray, ids: np.ndarray, obf_nbrs: list[set], plain_nbrs: list[set], mapping: np.ndarray
           ) -> np.ndarray:
    """Re-rank each id's candidates by the number of its mapped neighbours shared with the candidate's."""
    out = cand.copy()
    for r in range(len(ids)):
        mapped = {int(mapping[j]) for j in obf_nbrs[r] if mapping[j] >= 0}
        if not mapped:
            continue
        score = np.array([len(mapped & plain_nbrs[c]) for c in cand[r]])
        order = np.argsort(-score, kind="stable")  # ties keep the signature order
        out[r] = cand[r][order]
    return out


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None, rounds: int = 2, C: int = 32) -> IdGuess:
    b, n = t.budget, t.arch.vocab
    show = progress is not None
    rows = b.behaviour_rows or max(256, min(n, b.queries or n))
    q_ids, _ = t.query_ids(must=received)
    plain = plain_side(t, rows, show)
    obf_rows = np.sort(b.rng("behaviour").choice(n, size=min(rows, n), replace=False))
    forward = np.union1d(q_ids, obf_rows)
    model = load_model(t.obf_dir)
    sig_o, edges_o, full_o = single_token_pass(model, forward, obf_rows, b.batch, "behaviour/obfuscated", show)
    col_o = column_signature(full_o)
    fixed = t.fixed_ids
    movable = t.movable_ids
    k = max(b.topk, C)

    # output side: every id of the vocabulary
    cp, co = standardise(plain["col"], col_o)
    out_cand = nearest(co[torch.as_tensor(movable)], cp, k).numpy()
    mapping = np.full(n, -1)
    mapping[fixed] = fixed
    mapping[movable] = out_cand[:, 0]
    out_side_pred = mapping[movable].copy()

    # input side on the forwarded ids, combined with the output side
    pos = {int(o): i for i, o in enumerate(forward)}
    fq = np.array([pos[int(o)] for o in movable if int(o) in pos])
    fq_ids = forward[fq]
    ip, io = standardise(plain["sig"], sig_o[torch.as_tensor(fq)])
    in_pred = np.full(len(movable), -1)
    mov_pos = {int(o): i for i, o in enumerate(movable)}
    fq_rows = np.array([mov_pos[int(o)] for o in fq_ids], dtype=np.int64)
    in_pred[fq_rows] = nearest(io, ip, 1)[:, 0].numpy()
    both = nearest(torch.cat([io, co[torch.as_tensor(fq_ids)]], 1), torch.cat([ip, cp], 1), k).numpy()
    cand = out_cand.copy()
    cand[fq_rows] = both
    mapping[movable] = cand[:, 0]

    # graph refinement seeded by the fixed ids
    plain_out = [set(r) for r in plain["edges"].tolist()]
    plain_in = _in_edges(plain["edges"], np.arange(n), n)
    obf_out_sets = [set(r) for r in edges_o.tolist()]
    obf_in = _in_edges(edges_o, forward, n)
    sig_pred = cand[:, 0].copy()
    plain_nb = [a | c for a, c in zip(plain_out, plain_in)]
    for _ in range(rounds):
        nbrs = []
        for o in movable:
            s = set(obf_in[o])
            if int(o) in pos:
                s |= obf_out_sets[pos[int(o)]]
            nbrs.append(s)
        cand = refine(cand, movable, nbrs, plain_nb, mapping)
        mapping[movable] = cand[:, 0]
        if progress is not None:
            progress.update(1)
    return IdGuess(movable, cand[:, :b.topk], {
        "forwarded": int(len(forward)), "context_rows": int(len(obf_rows)),
        "output_side_pred": out_side_pred, "input_side_pred": in_pred, "signature_pred": sig_pred})
