"""Behavioural matching: the server runs the model it hosts and matches behaviour, not weights.

Not in the paper. The obfuscated model computes (up to its noise) ``p~(. | a~) = tau o p(. | tau^-1 a~)``, so any
statistic of its output distributions that ignores the labels of the ids is shared with the plain model. Three
stages, all without the secret:

1. **Output side.** For ``R`` single-token contexts drawn uniformly (different ones on each side; they are the same
   population), the log-probability that each *output* id receives; signature of an output id = the mean, spread
   and order statistics of its column over the R contexts. This averages the input noise away and gives a
   signature for every id of the vocabulary, forwarded or not; each is matched against the whole vocabulary and
   its ``C`` best candidates kept.
2. **Input side.** For each attacked obfuscated id, forward passes on that token alone and in short contexts after
   each of a few fixed special ids (identical in both spaces, e.g. ``<|im_start|> x``); signature = the sorted
   top-``S`` log-probabilities and the entropy of each next-token distribution (label-free). It re-ranks the id's
   candidates (plain forward passes are spent only on candidates, so the cost is ``R + queries * C`` plain passes
   per context instead of the whole vocabulary).
3. **Graph refinement, seeded.** The fixed special ids are anchors (identity). Each id is a node with out-edges to
   its top-``T`` next tokens (input side) and in-edges from the contexts that rank it in their top-``T`` (output
   side). Given the current mapping, each candidate (of the top ``C`` by signature) is re-scored by how many mapped
   neighbours it shares with the plain node; the mapping is updated and the scoring repeated (``rounds``).

The plain side is cached per plain model (it does not depend on the victim) and filled on demand.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe.attacks.common import Target, load_causal_lm, nearest, standardise
from aloe.attacks.scoring import IdGuess

S_TOP = 32          # sorted log-probs kept in the input-side signature
T_EDGES = 16        # top next tokens kept as graph edges
OUT_Q = 8           # order statistics of an output id's column
N_PREFIX = 2        # short contexts per id: the id after each of the first fixed special ids


def load_model(path: Path):
    return load_causal_lm(path)


@torch.no_grad()
def single_token_pass(model, ids: np.ndarray, rows: np.ndarray, batch: int, desc: str, progress: bool,
                      prefixes: tuple[int, ...] = ()):
    """Input-side signatures and top edges for ``ids``; full log-prob rows only for the ids in ``rows``. The
    signature has one block per context: the token alone, then the token after each id of ``prefixes``."""
    n = int(model.config.vocab_size)
    width = S_TOP + 1
    sig = torch.zeros(len(ids), width * (1 + len(prefixes)))
    edges = torch.zeros(len(ids), T_EDGES, dtype=torch.long)
    keep = np.isin(ids, rows)
    full = torch.zeros(int(keep.sum()), n, dtype=torch.float16)
    at = 0
    for s in tqdm(range(0, len(ids), batch), desc=desc, disable=not progress, unit="batch"):
        x = torch.as_tensor(ids[s:s + batch])[:, None]
        for c, prefix in enumerate((None, *prefixes)):
            inp = x if prefix is None else torch.cat([torch.full_like(x, prefix), x], 1)
            lp = torch.log_softmax(model(inp).logits[:, -1].float(), -1)
            top = lp.topk(max(S_TOP, T_EDGES), dim=1)
            sig[s:s + len(x), c * width:c * width + S_TOP] = top.values[:, :S_TOP]
            sig[s:s + len(x), c * width + S_TOP] = -(lp.exp() * lp).sum(1)
            if prefix is not None:
                continue
            edges[s:s + len(x)] = top.indices[:, :T_EDGES]
            m = torch.as_tensor(keep[s:s + batch])
            if m.any():
                full[at:at + int(m.sum())] = lp[m].half()
                at += int(m.sum())
    return sig, edges, full


def column_signature(full: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per output id: mean, std and order statistics of its log-probability over the sampled contexts. Columns go
    ``chunk`` at a time, so the whole-vocabulary table (49,152 x 49,152 in half precision) never exists in float or
    with sort indices at once."""
    idx = torch.linspace(0, full.shape[0] - 1, OUT_Q).round().long()
    out = []
    for c in range(0, full.shape[1], chunk):
        x = full[:, c:c + chunk].float()
        s = torch.sort(x, dim=0).values
        out.append(torch.cat([x.mean(0, keepdim=True), x.std(0, keepdim=True), s[idx]], 0).T)
    return torch.cat(out, 0)


class PlainSide:
    """Single-token behaviour of the plain model, computed on demand and cached per plain checkpoint (it does not
    depend on any victim): input-side signatures and top edges per id, and the output-side column signature over a
    fixed uniform sample of ``rows`` contexts."""

    def __init__(self, t: Target, rows: int, progress: bool, prefixes: tuple[int, ...] = ()):
        from aloe.assets.cache import cache_root

        self.n, self.batch, self.progress, self.dir = t.arch.vocab, t.budget.batch, progress, t.plain_dir
        self.prefixes = prefixes
        key = hashlib.sha256(f"{t._plain.fingerprint()}|{S_TOP}|{T_EDGES}|{OUT_Q}|{prefixes}|v3".encode()
                             ).hexdigest()[:20]
        self.path = cache_root() / "attacks" / f"behaviour-{key}-{rows}.pt"
        self._model = None
        if self.path.is_file():
            self.data = torch.load(self.path)
            return
        n = self.n
        self.data = {"sig": torch.zeros(n, (S_TOP + 1) * (1 + len(prefixes))),
                     "edges": torch.zeros(n, T_EDGES, dtype=torch.long), "done": torch.zeros(n, dtype=torch.bool)}
        sample = np.sort(np.random.default_rng().choice(n, size=min(rows, n), replace=False))
        sig, edges, full = single_token_pass(self.model, sample, sample, self.batch, "behaviour/plain contexts",
                                             progress, prefixes)
        self.data["col"] = column_signature(full)
        self._store(sample, sig, edges)

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.dir)
        return self._model

    def _store(self, ids, sig, edges) -> None:
        i = torch.as_tensor(ids)
        self.data["sig"][i], self.data["edges"][i], self.data["done"][i] = sig, edges, True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save(self.data, tmp)
        tmp.replace(self.path)

    def ensure(self, ids: np.ndarray) -> None:
        todo = np.setdiff1d(np.unique(ids), np.flatnonzero(self.data["done"].numpy()))
        if len(todo):
            sig, edges, _ = single_token_pass(self.model, todo, np.zeros(0, np.int64), self.batch,
                                              "behaviour/plain ids", self.progress, self.prefixes)
            self._store(todo, sig, edges)


def _in_edges(edges: torch.Tensor, src_ids: np.ndarray, n: int) -> list[set]:
    inc: list[set] = [set() for _ in range(n)]
    for s, row in zip(src_ids, edges.tolist()):
        for j in row:
            inc[j].add(int(s))
    return inc


def refine(cand: np.ndarray, obf_nbrs: list[set], plain_nbrs: list[set], mapping: np.ndarray) -> np.ndarray:
    """Re-rank each id's candidates by the number of its mapped neighbours shared with the candidate's."""
    out = cand.copy()
    for r in range(len(cand)):
        mapped = {int(mapping[j]) for j in obf_nbrs[r] if mapping[j] >= 0}
        if not mapped:
            continue
        score = np.array([len(mapped & plain_nbrs[c]) for c in cand[r]])
        out[r] = cand[r][np.argsort(-score, kind="stable")]  # ties keep the signature order
    return out


@torch.no_grad()
def attack(t: Target, received: np.ndarray, progress=None, rounds: int = 2, C: int = 16) -> IdGuess:
    b, n = t.budget, t.arch.vocab
    show = progress is not None
    rows = b.behaviour_rows or max(256, min(n, b.queries or n))
    q_ids, _ = t.query_ids(must=received, size=b.behaviour_queries or b.queries)
    prefixes = tuple(int(i) for i in t.fixed_ids[:N_PREFIX])  # public: fixed ids mean the same on both sides
    plain = PlainSide(t, rows, show, prefixes)
    obf_rows = np.sort(b.rng("behaviour").choice(n, size=min(rows, n), replace=False))
    forward = np.union1d(q_ids, obf_rows)
    sig_o, edges_o, full_o = single_token_pass(load_model(t.obf_dir), forward, obf_rows, b.batch,
                                               "behaviour/obfuscated", show, prefixes)
    col_o = column_signature(full_o)
    fixed, movable = t.fixed_ids, t.movable_ids
    k = max(b.topk, C)

    # 1. output side: a signature for every id of the vocabulary, matched against the whole vocabulary
    cp, co = standardise(plain.data["col"], col_o)
    cand = nearest(co[torch.as_tensor(movable)], cp, k).numpy()
    mapping = np.full(n, -1)
    mapping[fixed] = fixed
    mapping[movable] = cand[:, 0]
    out_side_pred = cand[:, 0].copy()

    # 2. input side for the forwarded ids: re-rank their output-side candidates by the combined distance
    mov_row = np.full(n, -1)
    mov_row[movable] = np.arange(len(movable))
    pos = np.full(n, -1)
    pos[forward] = np.arange(len(forward))
    fq = forward[np.isin(forward, movable)]
    plain.ensure(np.concatenate([cand[mov_row[fq]].ravel(), mapping[obf_rows]]))
    ip, io = standardise(plain.data["sig"][plain.data["done"]], sig_o)
    mu_sd = plain.data["sig"][plain.data["done"]]
    mu, sd = mu_sd.mean(0), mu_sd.std(0).clamp_min(1e-12)
    w = 1.0 / np.sqrt(io.shape[1])
    in_all = (plain.data["sig"] - mu) / sd * w
    in_pred = np.full(len(movable), -1)
    for o in fq:
        r = mov_row[o]
        c = torch.as_tensor(cand[r])
        d_in = ((in_all[c] - io[pos[o]]) ** 2).sum(1)
        d_out = ((cp[c] - co[o]) ** 2).sum(1)
        in_pred[r] = int(c[d_in.argmin()])
        cand[r] = cand[r][(d_in + d_out).argsort().numpy()]
    mapping[movable] = cand[:, 0]
    sig_pred = cand[:, 0].copy()

    # 3. graph refinement seeded by the fixed ids: out-edges of forwarded ids, in-edges from the contexts
    done = np.flatnonzero(plain.data["done"].numpy())
    p_edges = plain.data["edges"]
    plain_nb = [set() for _ in range(n)]
    for s, row in zip(done, p_edges[torch.as_tensor(done)].tolist()):
        plain_nb[s].update(row)
        for j in row:
            plain_nb[j].add(int(s))
    obf_nb = [set() for _ in range(n)]
    for s, row in zip(forward, edges_o.tolist()):
        obf_nb[s].update(row)
        for j in row:
            obf_nb[j].add(int(s))
    nbrs = [obf_nb[o] for o in movable]
    for _ in range(rounds):
        cand = refine(cand, nbrs, plain_nb, mapping)
        mapping[movable] = cand[:, 0]
        if progress is not None:
            progress.update(1)
    return IdGuess(movable, cand[:, :b.topk], extra={
        "forwarded": int(len(forward)), "short_contexts": len(prefixes),
        "context_rows": int(len(obf_rows)), "plain_forwarded": int(len(done)),
        "output_side_pred": out_side_pred, "input_side_pred": in_pred, "signature_pred": sig_pred})
