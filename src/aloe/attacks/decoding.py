"""Language-prior decoding: read the traffic as text, not one token at a time.

Every other attack of the suite guesses each obfuscated token (an id, or a cluster of linked occurrence vectors) on
its own. A server that holds the public model also holds a language model of the plaintext, and the traffic is
text: a substitution cipher over it (the fixed permutation of token-id serving, the linked clusters of the
client-held vocabulary) is what decipherment with a language prior solves. This module is that attacker, on top of
any per-token attack that ranks candidates.

The traffic is a list of :class:`Doc` (one per request or stream chunk): at each position either a plain token the
server sees in clear (fixed ids) or an occurrence of an unknown token, and every occurrence belongs to a cluster
(all occurrences of one obfuscated id, or one cluster of linked vectors) with the per-token attack's ranked
candidates. :func:`decode` picks one candidate per cluster by damped iterated conditional modes:

1. start from every cluster's first candidate;
2. at every occurrence, score each of its cluster's candidates with the language model against the traffic as
   currently decoded: the candidate given the positions before it, plus the positions after it given the
   candidate;
3. a cluster's score for candidate j is the sum of those log-probabilities over its occurrences plus log pi_j, where
   pi is the probability that the per-token attack's rank j is right; pi is not known to the attacker, so it is
   fitted by EM on the first sweep's scores (the posterior over each cluster's candidates, averaged), starting from
   a geometric prior that trusts the per-token ranking;
4. the share of clusters whose best candidate gains most over their current one move to it (moving all at once
   against contexts of the last sweep makes neighbours chase each other), and the sweep repeats; clusters whose
   runner-up is far behind are settled and no longer scored. With ``distinct`` (clusters that are different
   obfuscated ids), the final choice is one-to-one: the greedy assignment in order of confidence.

Four other searches are options: the monotone one keeps a sweep's moves only where they raise the language model's
log-probability of the whole traffic (:func:`text_logprob`); :func:`decode_em` is the classical decipherment
attack, EM with forward-backward over a bigram view of the model, summing over the neighbours' candidates instead of
conditioning on their current guesses; :func:`decode_sequential` scores one cluster at a time against its
neighbours' latest choices and samples its choice at a falling temperature (Gibbs sampling with annealing);
:func:`decode_beam` keeps several one-to-one readings at once, placing one cluster at a time (beam search).

No ground truth is used anywhere: the rank prior comes from EM, the language model is the public one. The guess is
only as good as the candidate lists (a token not among its cluster's candidates cannot be decoded), so a per-token
attack's top-k is the ceiling, and the decoder's gain is measured against its top-1 on the same candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from aloe import AloeError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # (B, L) ids -> (B, L, V) next-token logits


def _continuation_logprob(lp_cont: torch.Tensor, cont: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
    """Sum of the log-probabilities of ``cont`` (N, T): ``first`` (N, V) predicts its first id (None: no left
    context, the first id costs nothing) and ``lp_cont`` (N, T, V) row t predicts id t + 1."""
    tot = lp_cont[:, :-1].gather(2, cont[:, 1:, None])[:, :, 0].sum(1)
    if first is not None:
        tot = tot + first.gather(1, cont[:, :1])[:, 0]
    return tot


class LogitsScorer:
    """Scores continuations with a plain logits function (recomputes the left context for every candidate)."""

    def __init__(self, logits: LogitsFn):
        self.logits = logits

    @torch.no_grad()
    def __call__(self, left: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        """(B, k): log p(cont[b, j] | left[b]) for ``left`` (B, nl) and ``cont`` (B, k, T)."""
        B, k, T = cont.shape
        nl = left.shape[1]
        ids = torch.cat([left[:, None, :].expand(B, k, nl), cont], 2).reshape(B * k, nl + T)
        lp = torch.log_softmax(self.logits(ids).float(), -1)
        first = lp[:, nl - 1] if nl else None
        return _continuation_logprob(lp[:, nl:], cont.reshape(B * k, T), first).reshape(B, k)

    @torch.no_grad()
    def next_logprobs(self, prev: torch.Tensor) -> torch.Tensor:
        """(B, V): log p(. | prev[b]), a context of one token."""
        return torch.log_softmax(self.logits(prev[:, None])[:, -1].float(), -1)


class CausalLM:
    """The public causal language model (fp32, eval, CPU) as a continuation scorer: the left context runs once per
    occurrence and its key/value cache is shared by the k candidates."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def __call__(self, left: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        B, k, T = cont.shape
        flat = cont.reshape(B * k, T)
        if left.shape[1] == 0:
            lp = torch.log_softmax(self.model(input_ids=flat).logits.float(), -1)
            return _continuation_logprob(lp, flat, None).reshape(B, k)
        out = self.model(input_ids=left, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(k, 0)
        cache = out.cache
        cache.batch_repeat_interleave(k)
        lp = torch.log_softmax(self.model(input_ids=flat, cache=cache).logits.float(), -1)
        return _continuation_logprob(lp, flat, first).reshape(B, k)

    @torch.no_grad()
    def next_logprobs(self, prev: torch.Tensor) -> torch.Tensor:
        """(B, V): log p(. | prev[b]), a context of one token."""
        return torch.log_softmax(self.model(input_ids=prev[:, None]).logits[:, -1].float(), -1)


@dataclass
class Doc:
    """One stretch of traffic: at each position a plain id seen in clear (``known`` >= 0, ``occurrence`` -1) or an
    occurrence of an unknown token (``known`` -1, ``occurrence`` its index into the labels)."""

    known: np.ndarray
    occurrence: np.ndarray

    @classmethod
    def unknown(cls, occurrences: np.ndarray) -> Doc:
        occ = np.asarray(occurrences, dtype=np.int64)
        return cls(-np.ones(len(occ), dtype=np.int64), occ)

    @classmethod
    def from_ids(cls, ids: np.ndarray, visible: np.ndarray, start: int) -> tuple[Doc, np.ndarray]:
        """The doc of a stream of ids whose ``visible`` ones (fixed ids) are seen in clear; the others are numbered
        as occurrences from ``start``. Returns the doc and the ids of its occurrences, in order."""
        ids = np.asarray(ids, dtype=np.int64)
        clear = np.isin(ids, visible)
        occ = -np.ones(len(ids), dtype=np.int64)
        occ[~clear] = start + np.arange(int((~clear).sum()))
        return cls(np.where(clear, ids, -1), occ), ids[~clear]


@torch.no_grad()
def occurrence_logprobs(lm, docs: list[Doc], decoded: np.ndarray, cand_occ: np.ndarray, context: int = 16,
                        right: int = 2, batch: int = 64, active: np.ndarray | None = None) -> np.ndarray:
    """(m, k): log-probability of the text around each occurrence with each of its candidates in its place, the
    rest as currently ``decoded`` (plain id per occurrence): the candidate given up to ``context`` positions before
    it, plus the next ``right`` positions given it (so the tokens after an occurrence vote on it too). ``lm`` is a
    continuation scorer (:class:`CausalLM`, :class:`LogitsScorer`). Candidates -1 get -inf; occurrences outside
    ``active`` (a mask, default all) are not scored (0)."""
    m, k = cand_occ.shape
    out = np.where(cand_occ >= 0, 0.0, -np.inf)
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for doc in docs:
        occ = doc.occurrence
        seq = np.where(occ >= 0, decoded[np.maximum(occ, 0)], doc.known)
        for pos in np.flatnonzero(occ >= 0):
            if active is not None and not active[occ[pos]]:
                continue
            left, after = seq[max(0, pos - context):pos], seq[pos + 1:pos + 1 + right]
            groups.setdefault((len(left), len(after)), []).append((int(occ[pos]), left, after))
    for (nl, nr), items in groups.items():
        if nl + nr == 0:  # a doc of one occurrence: nothing to condition on
            continue
        for s in range(0, len(items), batch):
            part = items[s:s + batch]
            occs = np.array([o for o, _, _ in part])
            c = cand_occ[occs]                                             # (b, k)
            left = torch.as_tensor(np.array([x for _, x, _ in part], dtype=np.int64).reshape(len(part), nl))
            cont = np.empty((len(part), k, 1 + nr), dtype=np.int64)
            cont[:, :, 0] = np.maximum(c, 0)
            cont[:, :, 1:] = np.array([a for _, _, a in part], dtype=np.int64).reshape(len(part), 1, nr)
            score = lm(left, torch.as_tensor(cont)).double().numpy()
            out[occs] = np.where(c >= 0, score, -np.inf)
    return out


@torch.no_grad()
def text_logprob(lm, docs: list[Doc], decoded: np.ndarray, tokens_per_batch: int = 2048) -> float:
    """The language model's log-probability of the traffic as currently ``decoded`` (each doc scored whole, its first
    position free): the decoder's objective, besides the rank prior."""
    by_len: dict[int, list[np.ndarray]] = {}
    for doc in docs:
        if len(doc.known) > 1:
            occ = doc.occurrence
            by_len.setdefault(len(occ), []).append(np.where(occ >= 0, decoded[np.maximum(occ, 0)], doc.known))
    total = 0.0
    for n, seqs in by_len.items():
        b = max(1, tokens_per_batch // n)
        for s in range(0, len(seqs), b):
            cont = torch.as_tensor(np.stack(seqs[s:s + b]))[:, None, :]
            total += float(lm(torch.zeros(len(cont), 0, dtype=torch.int64), cont).double().sum())
    return total


def _rank_prior_em(S: np.ndarray, valid: np.ndarray, prior: np.ndarray, iters: int = 50) -> np.ndarray:
    """Fit pi (the chance that rank j is right) by EM: posterior over each cluster's candidates, averaged."""
    for _ in range(iters):
        logit = np.where(valid, S + np.log(prior)[None, :], -np.inf)
        logit -= logit.max(1, keepdims=True)
        post = np.exp(logit)
        post /= post.sum(1, keepdims=True)
        new = post.mean(0) + 1e-6
        new /= new.sum()
        if np.abs(new - prior).max() < 1e-7:
            return new
        prior = new
    return prior


def distinct_assignment(score: np.ndarray, cand: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each cluster's choice (column of ``cand``) such that no two clusters take one plain token: greedy, in order of
    each cluster's margin between its best and second-best candidate (a cluster whose candidates are all taken
    keeps its best)."""
    s = np.where(valid, score, -np.inf)
    best = np.argmax(s, 1)
    top2 = np.sort(s, 1)[:, ::-1]
    margin = top2[:, 0] - (top2[:, 1] if s.shape[1] > 1 else -np.inf)
    margin = np.where(np.isfinite(margin), margin, np.inf)
    taken: set[int] = set()
    choice = best.copy()
    for c in np.argsort(-margin, kind="stable"):
        for j in np.argsort(-s[c], kind="stable"):
            if not valid[c, j]:
                break
            if int(cand[c, j]) not in taken:
                choice[c] = j
                taken.add(int(cand[c, j]))
                break
    return choice


def decode(lm, docs: list[Doc], labels: np.ndarray, cand: np.ndarray, sweeps: int = 8,
           distinct: bool = False, prior_decay: float = 0.5, step: float = 0.25, context: int = 16, right: int = 2,
           monotone: bool = False, progress=None) -> dict:
    """Decode the traffic: ``labels`` (m,) the cluster of each occurrence, ``cand`` (n, k) each cluster's ranked
    plain candidates (-1: none). Each sweep scores the candidates of the clusters still in doubt against the text as
    currently decoded, and moves the ``step`` share of the occurring clusters whose score gains most (the
    contexts are those of the last sweep, so moving every cluster at once makes neighbours chase each other); a
    cluster whose runner-up is e^-12 behind is settled and no longer scored. The rank prior is fitted by EM on the
    first sweep. With ``monotone`` a sweep's moves are kept only if they raise the objective (the language model's
    log-probability of the whole traffic as decoded plus the rank prior of every choice); otherwise the share is
    halved and tried again, down to the single best gain, and the search stops when that one does not raise it
    either. The monotone search also scores a cluster that moved again, in its new contexts, before it can settle.
    Returns the ranked candidates (n, k) per cluster after decoding (the chosen one first, then the others by
    score), the rank prior and, per sweep, the share of occurring clusters that moved and the objective after it."""
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    n, k = cand.shape
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise AloeError("every occurrence needs the index of its cluster's candidates")
    valid = cand >= 0
    seen = np.zeros(len(labels), dtype=bool)
    for doc in docs:
        if len(doc.known) != len(doc.occurrence):
            raise AloeError("a decoding doc needs one known id or one occurrence per position")
        seen[doc.occurrence[doc.occurrence >= 0]] = True
    if not seen.all():
        raise AloeError(f"{int((~seen).sum())} occurrences are in no doc")
    if not valid[labels, 0].all():
        raise AloeError("every occurring cluster needs at least one candidate")
    prior = prior_decay ** np.arange(k, dtype=np.float64)
    prior /= prior.sum()
    # only the clusters that occur are decoded (and fit the prior); the others keep their ranking
    rows, local = np.unique(labels, return_inverse=True)
    c_rows, v_rows = cand[rows], valid[rows]
    choice = np.zeros(len(rows), dtype=np.int64)
    doubt = v_rows.sum(1) > 1
    S = np.zeros((len(rows), k))
    moved, objective = [], []

    def objective_of(ch: np.ndarray) -> float:
        return text_logprob(lm, docs, c_rows[local, ch[local]]) + float(np.log(prior)[ch].sum())

    for sweep in range(sweeps):
        if not doubt.any():
            break
        decoded = c_rows[local, choice[local]]
        lp = occurrence_logprobs(lm, docs, decoded, cand[labels], context, right, active=doubt[local])
        fresh = np.zeros((len(rows), k))
        np.add.at(fresh, local, lp)
        S[doubt] = fresh[doubt]
        if sweep == 0:
            prior = _rank_prior_em(S, v_rows, prior)
            current = objective_of(choice)
        score = np.where(v_rows, S + np.log(prior)[None, :], -np.inf)
        best = np.argmax(score, 1)
        gain = score[np.arange(len(rows)), best] - score[np.arange(len(rows)), choice]
        movers = np.flatnonzero(gain > 1e-9)
        movers = movers[np.argsort(-gain[movers], kind="stable")][:max(1, int(np.ceil(step * len(rows))))]
        before = choice
        while len(movers):
            trial = choice.copy()
            trial[movers] = best[movers]
            value = objective_of(trial)
            if not monotone or value > current:
                choice, current = trial, value
                break
            movers = movers[:len(movers) // 2]
        moved.append(float(len(movers) / len(rows)))
        objective.append(current)
        top2 = np.sort(score, 1)[:, ::-1]
        # settled: far ahead of its runner-up and at its best; the monotone search also asks that it was there before
        # this sweep's moves (a cluster that just moved was scored in the contexts of its old choice)
        settled = (top2[:, 0] - top2[:, 1] > 12) & (best == choice)
        if monotone:
            settled &= before == choice
        doubt = (v_rows.sum(1) > 1) & ~settled
        if progress is not None:
            progress.update(1)
        if not len(movers):
            break
    score = np.where(v_rows, S + np.log(prior)[None, :], -np.inf)
    if distinct:
        choice = distinct_assignment(score, c_rows, v_rows)
    score[np.arange(len(rows)), choice] = np.inf
    out = cand.copy()
    out[rows] = np.take_along_axis(c_rows, np.argsort(-score, 1, kind="stable"), 1)
    return {"candidates": out, "rank_prior": prior.tolist(), "moved": moved, "objective": objective,
            "sweeps": len(moved), "decoded_clusters": int(len(rows))}


def _cluster_scores(lm, seqs: list[np.ndarray], where: np.ndarray, cand_row: np.ndarray, context: int, right: int
                    ) -> np.ndarray:
    """(k,): for one cluster, the log-probability of the text around all its occurrences (``where``: (m, 2) doc and
    position) with each candidate in every one of them, against the traffic as decoded now (``seqs``)."""
    return _hypotheses_scores(lm, [seqs], where, cand_row, context, right)[0]


def _hypotheses_scores(lm, traffics: list[list[np.ndarray]], where: np.ndarray, cand_row: np.ndarray, context: int,
                       right: int, batch: int = 64) -> np.ndarray:
    """(H, k): :func:`_cluster_scores` of one cluster against each of H readings of the traffic (``traffics``); a
    window (the positions before an occurrence and after it) that several readings share is scored once, in batches
    of ``batch`` windows."""
    k = len(cand_row)
    groups: dict[tuple[int, int], tuple[list[int], list[np.ndarray]]] = {}
    for h, seqs in enumerate(traffics):
        for d, pos in where:
            seq = seqs[d]
            left, after = seq[max(0, pos - context):pos], seq[pos + 1:pos + 1 + right]
            if len(left) + len(after):
                owners, windows = groups.setdefault((len(left), len(after)), ([], []))
                owners.append(h)
                windows.append(np.concatenate([left, after]))
    total = np.zeros((len(traffics), k))
    for (nl, nr), (owners, windows) in groups.items():
        uniq, inverse = np.unique(np.array(windows, dtype=np.int64).reshape(len(windows), nl + nr), axis=0,
                                  return_inverse=True)
        scores = np.empty((len(uniq), k))
        for s in range(0, len(uniq), batch):
            part = uniq[s:s + batch]
            cont = np.empty((len(part), k, 1 + nr), dtype=np.int64)
            cont[:, :, 0] = np.maximum(cand_row, 0)[None, :]
            cont[:, :, 1:] = part[:, None, nl:]
            scores[s:s + batch] = lm(torch.as_tensor(np.ascontiguousarray(part[:, :nl])),
                                     torch.as_tensor(cont)).double().numpy()
        np.add.at(total, np.asarray(owners), scores[np.asarray(inverse).reshape(-1)])
    return np.where(cand_row[None, :] >= 0, total, -np.inf)


def _occurrence_places(docs: list[Doc], labels: np.ndarray, n: int
                       ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The occurring clusters (``rows``, sorted), each occurrence's index among them (``local``) and, per occurring
    cluster, its occurrences' places ((m, 2) doc and position); refuses labels outside the ``n`` clusters, docs
    whose two arrays differ in length and occurrences in no doc."""
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise AloeError("every occurrence needs the index of its cluster's candidates")
    for doc in docs:
        if len(doc.known) != len(doc.occurrence):
            raise AloeError("a decoding doc needs one known id or one occurrence per position")
    rows, local = np.unique(labels, return_inverse=True)
    where: list[list[tuple[int, int]]] = [[] for _ in rows]
    for d, doc in enumerate(docs):
        for pos in np.flatnonzero(doc.occurrence >= 0):
            where[local[doc.occurrence[pos]]].append((d, int(pos)))
    if sum(len(w) for w in where) != len(labels):
        raise AloeError(f"{len(labels) - sum(len(w) for w in where)} occurrences are in no doc")
    return rows, local, [np.array(w, dtype=np.int64).reshape(-1, 2) for w in where]


def decode_sequential(lm, docs: list[Doc], labels: np.ndarray, cand: np.ndarray, sweeps: int = 8,
                      temperature: float = 1.0, rng: np.random.Generator | None = None, distinct: bool = False,
                      prior_decay: float = 0.5, context: int = 16, right: int = 2, collision: float = 20.0,
                      progress=None) -> dict:
    """Decode the traffic one cluster at a time (Gibbs sampling with annealing): each sweep visits the occurring
    clusters in a random order and scores a cluster's candidates against the traffic as decoded at that moment, so
    every neighbour's latest choice counts (the parallel sweeps of :func:`decode` score every cluster against the
    last sweep's text). The cluster then draws its candidate with probability proportional to exp(score / T), T
    falling linearly from ``temperature`` at the first sweep to 0 at the last (which takes the best: iterated
    conditional modes; ``temperature`` 0 makes every sweep greedy). Scores are those of :func:`decode` (the candidate
    given ``context`` positions before it, the ``right`` positions after it given the candidate, summed over the
    cluster's occurrences, plus log pi_j of the rank prior, fitted by EM on a first scoring of every cluster against
    the first choices). With ``distinct`` (every cluster a different obfuscated id, so a different plain token) a
    candidate pays ``collision`` nats, times the sweep's share of the way from the first sweep to the last, for every
    other cluster that reads its token now, so the search is pushed to end one-to-one; the final choice is then made
    one-to-one (:func:`distinct_assignment`, the searched choice first). The reading with the best objective
    (:func:`text_logprob` plus the rank prior) at the end of a sweep is returned; with ``distinct``, the last sweep's,
    the only one made under the full penalty. ``rng`` is the attacker's own randomness. Returns the ranked candidates
    (n, k) (the chosen one first, then the others by their last score), the rank prior, per sweep the temperature,
    the share of occurring clusters that changed and the objective after it."""
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    n, k = cand.shape
    if sweeps < 1:
        raise AloeError(f"the sequential decoder needs at least one sweep (got {sweeps})")
    if not temperature >= 0:
        raise AloeError(f"the start temperature must be >= 0 (got {temperature})")
    rows, local, where_arr = _occurrence_places(docs, labels, n)
    if not (cand[labels, 0] >= 0).all():
        raise AloeError("every occurring cluster needs at least one candidate")
    rng = rng if rng is not None else np.random.default_rng()
    c_rows = cand[rows]
    v_rows = c_rows >= 0
    choice = np.zeros(len(rows), dtype=np.int64)
    seqs = [np.where(doc.occurrence >= 0, c_rows[local[np.maximum(doc.occurrence, 0)], 0], doc.known)
            for doc in docs]
    # the rank prior, fitted on every cluster scored against the first choices
    prior = prior_decay ** np.arange(k, dtype=np.float64)
    prior /= prior.sum()
    lp = occurrence_logprobs(lm, docs, c_rows[local, 0], cand[labels], context, right)
    S = np.zeros((len(rows), k))
    np.add.at(S, local, lp)
    prior = _rank_prior_em(S, v_rows, prior)
    log_prior = np.log(prior)

    def objective_of(ch: np.ndarray) -> float:
        return text_logprob(lm, docs, c_rows[local, ch[local]]) + float(log_prior[ch].sum())

    best_choice, best_value = choice.copy(), objective_of(choice)
    temps, changed, objective = [], [], []
    doubt = np.flatnonzero(v_rows.sum(1) > 1)
    readers: dict[int, int] = {}  # plain token -> how many clusters read it now
    for r in range(len(rows)):
        readers[int(c_rows[r, choice[r]])] = readers.get(int(c_rows[r, choice[r]]), 0) + 1

    def place(r: int, j: int) -> None:
        old, new = int(c_rows[r, choice[r]]), int(c_rows[r, j])
        readers[old] -= 1
        readers[new] = readers.get(new, 0) + 1
        choice[r] = j
        for d, pos in where_arr[r]:
            seqs[d][pos] = new

    for sweep in range(sweeps):
        T = temperature * (1 - sweep / (sweeps - 1)) if sweeps > 1 else 0.0
        lam = collision * sweep / (sweeps - 1) if sweeps > 1 else collision
        moved = 0
        for r in rng.permutation(doubt):
            S[r] = _cluster_scores(lm, seqs, where_arr[r], c_rows[r], context, right)
            score = np.where(v_rows[r], S[r] + log_prior, -np.inf)
            if distinct:  # every other cluster that reads a candidate's token costs the collision penalty
                taken = np.array([readers.get(int(t), 0) - (q == choice[r]) for q, t in enumerate(c_rows[r])])
                score = score - lam * taken
            if T > 0:
                p = np.exp((score - score.max()) / T)
                j = int(rng.choice(k, p=p / p.sum()))
            else:
                j = int(np.argmax(score))
            if j != choice[r]:
                place(r, j)
                moved += 1
        value = objective_of(choice)
        # one-to-one, only the last sweep's reading was made under the full collision penalty: the earlier ones may
        # read two ids as one token, and their objective does not count that
        if value > best_value or (distinct and sweep == sweeps - 1):
            best_choice, best_value = choice.copy(), value
        temps.append(float(T))
        changed.append(float(moved / len(rows)) if len(rows) else 0.0)
        objective.append(value)
        if progress is not None:
            progress.update(1)
    choice = best_choice
    score = np.where(v_rows, S + log_prior[None, :], -np.inf)
    if distinct:
        # one plain token per cluster: the searched choice first, by the margin of its last score
        score[np.arange(len(rows)), choice] = np.maximum(score.max(1), score[np.arange(len(rows)), choice]) + 1e-6
        choice = distinct_assignment(score, c_rows, v_rows)
    score[np.arange(len(rows)), choice] = np.inf
    out = cand.copy()
    out[rows] = np.take_along_axis(c_rows, np.argsort(-score, 1, kind="stable"), 1)
    return {"candidates": out, "rank_prior": prior.tolist(), "temperature": temps, "moved": changed,
            "objective": objective, "best_objective": best_value, "sweeps": len(changed),
            "decoded_clusters": int(len(rows))}


def _windows_logprob(lm, seqs: list[np.ndarray], where: np.ndarray, context: int, right: int) -> float:
    """The log-probability of the text at the positions ``where`` ((m, 2) doc and position, each once) and the
    ``right`` positions after each, given up to ``context`` positions before it, in the traffic ``seqs``: the local
    objective of :func:`_cluster_scores` for a change of several clusters at once."""
    groups: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for d, pos in where:
        seq = seqs[d]
        left, cont = seq[max(0, pos - context):pos], seq[pos:pos + 1 + right]
        if len(left) + len(cont) > 1:
            groups.setdefault((len(left), len(cont)), []).append((left, cont))
    total = 0.0
    for (nl, nc), items in groups.items():
        left = torch.as_tensor(np.array([x for x, _ in items], dtype=np.int64).reshape(len(items), nl))
        cont = torch.as_tensor(np.array([c for _, c in items], dtype=np.int64).reshape(len(items), 1, nc))
        total += float(lm(left, cont).double().sum())
    return total


def _given_prior(prior: np.ndarray | None, k: int) -> np.ndarray | None:
    """A rank prior given to a search, checked: a positive chance for each of the ``k`` ranks (None: none given)."""
    if prior is None:
        return None
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (k,) or not (prior > 0).all():
        raise AloeError(f"the rank prior needs a positive chance for each of the {k} ranks")
    return prior


def refine_distinct(lm, docs: list[Doc], labels: np.ndarray, cand: np.ndarray, start: np.ndarray, sweeps: int = 3,
                    rng: np.random.Generator | None = None, prior_decay: float = 0.5, context: int = 16,
                    right: int = 2, tries: int = 3, prior: np.ndarray | None = None,
                    on_sweep: Callable[[np.ndarray], None] | None = None, held: np.ndarray | None = None,
                    progress=None) -> dict:
    """Search the one-to-one readings only (every cluster a different obfuscated id, so a different plain token), from
    ``start`` (n,), a plain token per cluster among its candidates (a decoder's output; where two occurring clusters
    read one token, the greedy one-to-one assignment that keeps most of it: a cluster whose candidates are all taken
    keeps sharing, and the search never makes a cluster share a token). The searches above score every reading and make
    it one-to-one at the end; this one never leaves the one-to-one readings, so the objective it raises is the objective
    of what it returns. Each sweep visits the occurring clusters in a random order and scores a cluster's candidates
    against the traffic as decoded at that moment (the scores of :func:`decode_sequential`: the candidate given
    ``context`` positions before it, the ``right`` positions after it given the candidate, over the cluster's
    occurrences, plus log pi_j of the rank prior fitted by EM against the start, or ``prior`` as given). Up to ``tries``
    candidates that score above the current one, best first, are tried: a token no other cluster reads is taken at once;
    a token another cluster (its holder) reads is taken in a swap, the holder moving to its best candidate (by its last
    scores) among the mover's old token (where the mover read it alone) and the tokens no cluster reads, and the swap
    is made if the text around both clusters' occurrences, scored jointly before and after, plus the rank prior,
    gains. The search stops after a sweep
    that changes nothing, and returns the reading, among the start and the sweeps', with the best objective over the
    whole traffic (:func:`text_logprob` plus the rank prior: the local scores see a few positions around each occurrence
    only). ``rng`` is the attacker's own randomness. ``on_sweep`` receives the start (made one-to-one) and then, after
    every sweep that changed something, the reading (n,): the plain token of every cluster, its first candidate where it
    does not occur. ``held`` (n,) marks clusters that keep their start token throughout: they take it first when the
    start is made one-to-one (their tokens must differ), are never visited and never give their token up in a swap;
    the search completes the others around them. Returns the ranked candidates (n, k) (the chosen one first, then the
    others by their last score), the rank prior, the objective of the start and of the reading returned, how many
    clusters share their token with another at the start and at the end, and, per sweep that changed something, the
    share of occurring clusters that moved alone or in a swap and the objective after it."""
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    start = np.asarray(start, dtype=np.int64)
    n, k = cand.shape
    if sweeps < 1:
        raise AloeError(f"the one-to-one search needs at least one sweep (got {sweeps})")
    if tries < 1:
        raise AloeError(f"the one-to-one search needs at least one candidate to try (got {tries})")
    if start.shape != (n,):
        raise AloeError(f"the start reading needs one plain token per cluster ({n}), got shape {start.shape}")
    prior = _given_prior(prior, k)
    rows, local, where_arr = _occurrence_places(docs, labels, n)
    c_rows = cand[rows]
    v_rows = c_rows >= 0
    listed = (c_rows == start[rows, None]) & v_rows
    if not listed.any(1).all():
        raise AloeError(f"{int((~listed.any(1)).sum())} occurring clusters start from a token outside their "
                        "candidates")
    if held is not None:
        held = np.asarray(held, dtype=bool)
        if held.shape != (n,):
            raise AloeError(f"the held mask needs one flag per cluster ({n}), got shape {held.shape}")
        held = held[rows]
        if len(np.unique(start[rows][held])) < int(held.sum()):
            raise AloeError("two held clusters start from the same token: a one-to-one reading cannot hold both")
    else:
        held = np.zeros(len(rows), dtype=bool)
    rng = rng if rng is not None else np.random.default_rng()
    # one-to-one start: the held clusters keep their tokens; the others take the start's token first, then the others
    # by rank, among the tokens no held cluster reads (where none is left, the start's token, shared)
    rank_score = np.where(listed, 1.0, 0.0) - np.arange(k)[None, :] * 1e-3
    unheld = v_rows & ~np.isin(c_rows, start[rows][held])
    choice = np.argmax(listed, 1)
    rest = np.flatnonzero(~held & unheld.any(1))
    choice[rest] = distinct_assignment(rank_score[rest], c_rows[rest], unheld[rest])
    S = np.zeros((len(rows), k))
    np.add.at(S, local, occurrence_logprobs(lm, docs, c_rows[local, choice[local]], cand[labels], context, right))
    if prior is None:
        prior = prior_decay ** np.arange(k, dtype=np.float64)
        prior = _rank_prior_em(S, v_rows, prior / prior.sum())
    log_prior = np.log(prior)
    seqs = [np.where(doc.occurrence >= 0, c_rows[local[np.maximum(doc.occurrence, 0)], choice[local[np.maximum(
        doc.occurrence, 0)]]], doc.known) for doc in docs]
    readers: dict[int, set[int]] = {}  # plain token -> the clusters that read it now
    for r in range(len(rows)):
        readers.setdefault(int(c_rows[r, choice[r]]), set()).add(r)

    def shared_of(ch: np.ndarray) -> int:
        """How many clusters read a token another cluster reads too."""
        _, inverse, counts = np.unique(c_rows[np.arange(len(rows)), ch], return_inverse=True, return_counts=True)
        return int((counts[inverse] > 1).sum())

    start_shared = shared_of(choice)

    def objective_of(ch: np.ndarray) -> float:
        return text_logprob(lm, docs, c_rows[local, ch[local]]) + float(log_prior[ch].sum())

    def place(r: int, j: int) -> None:
        old = int(c_rows[r, choice[r]])
        readers[old].discard(r)
        if not readers[old]:
            del readers[old]
        choice[r] = j
        readers.setdefault(int(c_rows[r, j]), set()).add(r)
        for d, pos in where_arr[r]:
            seqs[d][pos] = c_rows[r, j]

    def reading(ch: np.ndarray) -> np.ndarray:
        now = cand[:, 0].copy()
        now[rows] = c_rows[np.arange(len(rows)), ch]
        return now

    start_value = best_value = objective_of(choice)
    best_choice = choice.copy()
    if on_sweep is not None:
        on_sweep(reading(choice))
    moved, swapped, objective = [], [], []
    doubt = np.flatnonzero((v_rows.sum(1) > 1) & ~held)
    for _ in range(sweeps):
        n_moved = n_swapped = 0
        for r in rng.permutation(doubt):
            S[r] = _cluster_scores(lm, seqs, where_arr[r], c_rows[r], context, right)
            score = np.where(v_rows[r], S[r] + log_prior, -np.inf)
            cur = int(choice[r])
            for j in [int(j) for j in np.argsort(-score, kind="stable") if score[j] > score[cur] + 1e-9][:tries]:
                holders = readers.get(int(c_rows[r, j]))
                if not holders:
                    place(r, j)
                    n_moved += 1
                    break
                if len(holders) > 1:  # a token two clusters read (a start the candidates left shared): no swap
                    continue
                h = next(iter(holders))
                if held[h]:  # a held cluster keeps its token
                    continue
                mine = readers[int(c_rows[r, cur])] == {r}  # the mover's token is free once it leaves
                free = np.array([v_rows[h, q] and ((mine and c_rows[h, q] == c_rows[r, cur]) or
                                                   int(c_rows[h, q]) not in readers) for q in range(k)])
                if not free.any():
                    continue
                # the holder's last scores pick where it goes; the joint score of the swap decides
                jh = int(np.argmax(np.where(free, S[h] + log_prior, -np.inf)))
                both = np.unique(np.concatenate([where_arr[r], where_arr[h]]), axis=0)
                old = _windows_logprob(lm, seqs, both, context, right) + log_prior[cur] + log_prior[choice[h]]
                was_h = int(choice[h])
                place(h, jh)
                place(r, j)
                new = _windows_logprob(lm, seqs, both, context, right) + log_prior[j] + log_prior[jh]
                if new > old + 1e-9:
                    n_swapped += 1
                    break
                place(r, cur)
                place(h, was_h)
        if progress is not None:
            progress.update(1)
        if not n_moved + n_swapped:
            break
        value = objective_of(choice)
        moved.append(float(n_moved / len(rows)))
        swapped.append(float(2 * n_swapped / len(rows)))
        objective.append(value)
        if on_sweep is not None:
            on_sweep(reading(choice))
        if value > best_value:
            best_choice, best_value = choice.copy(), value
    # every reading searched is one-to-one: the best by the whole traffic's objective is returned
    choice = best_choice
    score = np.where(v_rows, S + log_prior[None, :], -np.inf)
    score[np.arange(len(rows)), choice] = np.inf
    out = cand.copy()
    out[rows] = np.take_along_axis(c_rows, np.argsort(-score, 1, kind="stable"), 1)
    return {"candidates": out, "rank_prior": prior.tolist(), "start_objective": start_value, "moved": moved,
            "shared_at_start": start_shared, "shared": shared_of(choice),
            "swapped": swapped, "objective": objective, "best_objective": best_value, "sweeps": len(objective),
            "decoded_clusters": int(len(rows))}


@dataclass
class _Hypothesis:
    """One reading of the beam: its score (the sum of its local gains), the choice of every occurring cluster, the
    traffic so read, the tokens taken (by the clusters placed in this pass and those with a single candidate) and,
    per placed cluster, the scores its candidates had when it was placed (a chain, newest first)."""

    score: float
    choice: np.ndarray
    seqs: list[np.ndarray]
    taken: frozenset
    trail: tuple | None


def decode_beam(lm, docs: list[Doc], labels: np.ndarray, cand: np.ndarray, width: int = 8, passes: int = 2,
                prior_decay: float = 0.5, context: int = 16, right: int = 2, prior: np.ndarray | None = None,
                progress=None) -> dict:
    """Decode the traffic by beam search over one-to-one readings (every cluster a different obfuscated id, so a
    different plain token). A pass places the occurring clusters one at a time, the most frequent first (the
    classical extension order of decipherment); ``width`` readings are kept. Placing cluster r extends every kept
    reading by each of r's candidates that no cluster placed before it in that reading has taken (a reading whose
    candidates for r are all taken keeps r's current token, shared): the extension gains the local score of the
    candidate (the scores of :func:`decode_sequential`: the candidate given ``context`` positions before it, the
    ``right`` positions after it given the candidate, summed over r's occurrences, plus log pi_j of the rank prior)
    less that of r's current token, both against that reading's own traffic, in which the clusters not yet placed
    read their current tokens. The ``width`` extensions with the highest summed gain are kept, so a choice that
    reads worse alone but better with its neighbours' later choices survives where a greedy search drops it.
    At the end of a pass every kept reading is scored by the whole traffic's objective (:func:`text_logprob` plus
    the rank prior) and the best is the current reading of the next pass (the first pass starts from every
    cluster's first candidate); the search stops after ``passes`` passes or a pass that changes nothing, and
    returns the best reading of any pass. The rank prior is fitted by EM on a first scoring of every cluster
    against the first choices, or ``prior`` as given. Returns the ranked candidates (n, k) (the chosen one first,
    then the others by their scores when the cluster was placed), the rank prior, the objective of the start (the
    first choices, not one-to-one), per pass the objective of its best reading, the spread of the kept readings'
    objectives and the share of occurring clusters that changed, and how many clusters share their token."""
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    n, k = cand.shape
    if width < 1:
        raise AloeError(f"the beam needs a width of at least one reading (got {width})")
    if passes < 1:
        raise AloeError(f"the beam search needs at least one pass (got {passes})")
    prior = _given_prior(prior, k)
    rows, local, where_arr = _occurrence_places(docs, labels, n)
    if not (cand[labels, 0] >= 0).all():
        raise AloeError("every occurring cluster needs at least one candidate")
    c_rows = cand[rows]
    v_rows = c_rows >= 0
    S = np.zeros((len(rows), k))
    np.add.at(S, local, occurrence_logprobs(lm, docs, c_rows[local, 0], cand[labels], context, right))
    if prior is None:
        prior = prior_decay ** np.arange(k, dtype=np.float64)
        prior = _rank_prior_em(S, v_rows, prior / prior.sum())
    log_prior = np.log(prior)

    def objective_of(ch: np.ndarray) -> float:
        return text_logprob(lm, docs, c_rows[local, ch[local]]) + float(log_prior[ch].sum())

    counts = np.bincount(local, minlength=len(rows))
    doubt = np.flatnonzero(v_rows.sum(1) > 1)
    order = doubt[np.argsort(-counts[doubt], kind="stable")]
    fixed = frozenset(int(c_rows[r, 0]) for r in np.flatnonzero(v_rows.sum(1) == 1))
    current = np.zeros(len(rows), dtype=np.int64)
    start_value = objective_of(current)
    best_choice, best_value, best_trail = None, -np.inf, None
    objective, spread, changed = [], [], []
    for _ in range(passes):
        seqs = [np.where(doc.occurrence >= 0, c_rows[local[np.maximum(doc.occurrence, 0)],
                                                      current[local[np.maximum(doc.occurrence, 0)]]], doc.known)
                for doc in docs]
        beam = [_Hypothesis(0.0, current.copy(), seqs, fixed, None)]
        for r in order:
            sc = _hypotheses_scores(lm, [h.seqs for h in beam], where_arr[r], c_rows[r], context, right)
            sc = np.where(v_rows[r][None, :], sc + log_prior[None, :], -np.inf)
            ext = []
            for i, h in enumerate(beam):
                now = int(h.choice[r])
                free = [j for j in np.flatnonzero(v_rows[r]) if int(c_rows[r, j]) not in h.taken]
                for j in free or [now]:
                    ext.append((h.score + float(sc[i, j] - sc[i, now]), i, int(j)))
            ext.sort(key=lambda e: -e[0])  # stable: ties keep the older reading and the better rank first
            nxt = []
            for score, i, j in ext[:width]:
                h = beam[i]
                choice = h.choice.copy()
                choice[r] = j
                seqs = list(h.seqs)
                token = int(c_rows[r, j])
                for d in np.unique(where_arr[r][:, 0]):
                    seqs[d] = seqs[d].copy()
                    seqs[d][where_arr[r][where_arr[r][:, 0] == d, 1]] = token
                nxt.append(_Hypothesis(score, choice, seqs, h.taken | {token}, (r, sc[i], h.trail)))
            beam = nxt
            if progress is not None:
                progress.update(1)
        values = [objective_of(h.choice) for h in beam]
        top = int(np.argmax(values))
        objective.append(values[top])
        spread.append(float(values[top] - min(values)))
        changed.append(float((beam[top].choice != current).mean()) if len(rows) else 0.0)
        if values[top] > best_value:
            best_choice, best_value, best_trail = beam[top].choice.copy(), values[top], beam[top].trail
        if (beam[top].choice == current).all():
            break
        current = beam[top].choice.copy()
    # the scores each cluster's candidates had when the best reading placed it rank the others
    trail = best_trail
    placed = np.zeros(len(rows), dtype=bool)
    while trail is not None:
        r, row, trail = trail
        if not placed[r]:
            S[r], placed[r] = row - log_prior, True
    choice = best_choice
    score = np.where(v_rows, S + log_prior[None, :], -np.inf)
    score[np.arange(len(rows)), choice] = np.inf
    out = cand.copy()
    out[rows] = np.take_along_axis(c_rows, np.argsort(-score, 1, kind="stable"), 1)
    readers = c_rows[np.arange(len(rows)), choice]
    _, inverse, shared = np.unique(readers, return_inverse=True, return_counts=True)
    return {"candidates": out, "rank_prior": prior.tolist(), "start_objective": start_value, "objective": objective,
            "spread": spread, "moved": changed, "best_objective": best_value, "passes": len(objective),
            "width": width, "shared": int((shared[inverse] > 1).sum()), "decoded_clusters": int(len(rows))}


def pair_logprobs(lm, pairs: np.ndarray, batch: int = 256) -> np.ndarray:
    """log p(b | a) for each row (a, b) of ``pairs`` under ``lm`` with a context of one token (its bigram view)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    prev, inv = np.unique(pairs[:, 0], return_inverse=True)
    out = np.empty(len(pairs))
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(prev) + 1))
    for s in range(0, len(prev), batch):
        lp = lm.next_logprobs(torch.as_tensor(prev[s:s + batch])).double().numpy()
        rows = order[bounds[s]:bounds[min(s + batch, len(prev))]]
        out[rows] = lp[inv[rows] - s, pairs[rows, 1]]
    return out


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def decode_em(lm, docs: list[Doc], labels: np.ndarray, cand: np.ndarray, iters: int = 50, distinct: bool = False,
              prior_decay: float = 0.5, progress=None) -> dict:
    """Decipherment by EM over a bigram view of the language model (the classical substitution-cipher attack):
    each doc is a chain whose states at an occurrence are its cluster's candidates (a plain id seen in clear is its
    one state), the transitions log p(b | a) of the public model with one token of context, the emissions a channel
    theta(cluster | plain token) over the candidate lists. Forward-backward marginalises over every neighbour's
    candidates (the sweeps' search conditions on their current guesses instead); the M-step re-estimates theta from
    the expected counts, starting from the per-token attack's ranking (a geometric prior over ranks). Each cluster
    then takes the candidate with the most posterior mass over its occurrences (one-to-one with ``distinct``).
    Returns the ranked candidates (n, k), the log-likelihood of the traffic per iteration and the iterations run."""
    labels = np.asarray(labels, dtype=np.int64)
    cand = np.asarray(cand, dtype=np.int64)
    n, k = cand.shape
    if iters < 1:
        raise AloeError(f"the EM decoder needs at least one iteration (got {iters})")
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise AloeError("every occurrence needs the index of its cluster's candidates")
    if not (cand[labels, 0] >= 0).all():
        raise AloeError("every occurring cluster needs at least one candidate")
    rows, local = np.unique(labels, return_inverse=True)
    c_rows = cand[rows]
    v_rows = c_rows >= 0
    # the states of every position of every doc: (T, k) plain ids, -1 where none
    chains, occs = [], []
    for doc in docs:
        if len(doc.known) != len(doc.occurrence):
            raise AloeError("a decoding doc needs one known id or one occurrence per position")
        st = np.full((len(doc.known), k), -1, dtype=np.int64)
        is_occ = doc.occurrence >= 0
        st[~is_occ, 0] = doc.known[~is_occ]
        st[is_occ] = c_rows[local[doc.occurrence[is_occ]]]
        chains.append(st)
        occs.append(np.where(is_occ, local[np.maximum(doc.occurrence, 0)], -1))
    # the transitions between consecutive positions: (T - 1, k, k) log p(b | a), -inf where a state is missing;
    # the model is asked once per unique pair
    masks = [(st[:-1, :, None] >= 0) & (st[1:, None, :] >= 0) for st in chains]
    pairs = [np.stack(np.broadcast_arrays(st[:-1, :, None], st[1:, None, :]), -1)[ok] for st, ok in zip(chains, masks)]
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
    lp_pairs = pair_logprobs(lm, uniq)[inv.reshape(-1)]
    trans, at = [], 0
    for ok in masks:
        t = np.full(ok.shape, -np.inf)
        t[ok] = lp_pairs[at:at + int(ok.sum())]
        at += int(ok.sum())
        trans.append(t)
    # theta(cluster | plain): normalised over the clusters that rank each plain token
    _, plain_idx = np.unique(c_rows[v_rows], return_inverse=True)
    n_plain = int(plain_idx.max()) + 1 if plain_idx.size else 0

    def normalise(mass: np.ndarray) -> np.ndarray:
        tot = np.bincount(plain_idx, weights=mass[v_rows], minlength=n_plain)
        theta = np.full(mass.shape, -np.inf)
        theta[v_rows] = np.log(mass[v_rows] + 1e-12) - np.log(tot[plain_idx] + 1e-12)
        return theta

    log_theta = normalise(np.where(v_rows, prior_decay ** np.arange(k, dtype=np.float64)[None, :], 0.0))
    loglik = []
    for _ in range(iters):
        counts = np.zeros(c_rows.shape)
        total = 0.0
        for st, occ, tr in zip(chains, occs, trans):
            emit = np.where(st >= 0, 0.0, -np.inf)
            o = occ >= 0
            emit[o] = log_theta[occ[o]]
            T = len(st)
            alpha = np.empty((T, k))
            beta = np.zeros((T, k))
            alpha[0] = emit[0]
            for t in range(1, T):
                alpha[t] = _logsumexp(alpha[t - 1][:, None] + tr[t - 1], 0) + emit[t]
            for t in range(T - 2, -1, -1):
                beta[t] = _logsumexp(tr[t] + (emit[t + 1] + beta[t + 1])[None, :], 1)
            z = float(_logsumexp(alpha[-1], 0))
            total += z
            post = np.exp(alpha + beta - z)
            np.add.at(counts, occ[o], post[o])
        loglik.append(total)
        log_theta = normalise(counts + 1e-3 * v_rows)
        if progress is not None:
            progress.update(1)
        if len(loglik) > 1 and abs(loglik[-1] - loglik[-2]) < 1e-4 * abs(loglik[-1]):
            break
    score = np.where(v_rows, np.log(counts + 1e-12), -np.inf)
    choice = distinct_assignment(score, c_rows, v_rows) if distinct else np.argmax(score, 1)
    score[np.arange(len(rows)), choice] = np.inf
    out = cand.copy()
    out[rows] = np.take_along_axis(c_rows, np.argsort(-score, 1, kind="stable"), 1)
    return {"candidates": out, "loglik": loglik, "iterations": len(loglik), "decoded_clusters": int(len(rows)),
            "transition_pairs": int(len(uniq))}


def traffic_docs(streams: list[np.ndarray], rows: dict[int, int], visible: np.ndarray, min_run: int = 2
                 ) -> tuple[list[Doc], np.ndarray]:
    """Docs of token-id traffic (each stream a request or a stretch of the victim's stream, in obfuscated ids):
    ``visible`` ids are seen in clear, every other id is an occurrence of the cluster ``rows[id]``. Where an id has
    no cluster (the per-token attack did not rank it) the stream is cut there, and the runs of at least ``min_run``
    positions are kept. Returns the docs and the cluster of every occurrence."""
    docs, labels = [], []
    for s in streams:
        s = np.asarray(s, dtype=np.int64)
        ok = np.isin(s, visible) | np.isin(s, np.fromiter(rows, dtype=np.int64, count=len(rows)))
        cuts = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        for lo, hi in zip(cuts[::2], cuts[1::2]):
            if hi - lo < min_run:
                continue
            doc, occ_ids = Doc.from_ids(s[lo:hi], visible, sum(len(x) for x in labels))
            docs.append(doc)
            labels.append(np.array([rows[int(o)] for o in occ_ids], dtype=np.int64))
    return docs, (np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64))


def check_budget(b) -> None:
    """The decoder's knobs of a :class:`~aloe.attacks.common.Budget` make sense (checked before any attack runs)."""
    if b.decode_sweeps < 1:
        raise AloeError(f"the decoder needs at least one sweep (got {b.decode_sweeps})")
    if b.decode_beam < 0:
        raise AloeError(f"the beam's width must be >= 0 (got {b.decode_beam})")
    if b.decode_em < 0 or sum((b.decode_em > 0, b.decode_monotone, b.decode_sequential, b.decode_beam > 0)) > 1:
        raise AloeError("choose one decoder search: EM iterations (>= 1), the monotone sweeps, the sequential "
                        "search or the beam, not two")
    if b.decode_swaps < 0:
        raise AloeError(f"the one-to-one search's sweeps must be >= 0 (got {b.decode_swaps})")
    if b.decode_from_victim < 0:
        raise AloeError(f"the sweeps from the victim's reading must be >= 0 (got {b.decode_from_victim})")
    if b.decode_completion < 0:
        raise AloeError(f"the sweeps completing the victim's reading must be >= 0 (got {b.decode_completion})")
    if not b.decode_temperature >= 0:
        raise AloeError(f"the start temperature must be >= 0 (got {b.decode_temperature})")


def attack(t, guess, obf_prompts: list[np.ndarray], obf_stream: np.ndarray, progress=None):
    """Token-id serving: decode the victim's traffic as the server receives it (its prompts, and the first
    ``budget.decode_stream`` ids of its stream in chunks of 512) over the candidates of a per-id guess
    (:class:`~aloe.attacks.scoring.IdGuess`), the public model as the language prior, one plain token per
    obfuscated id (``distinct``), in at most ``budget.decode_sweeps`` sweeps (kept only where they raise the
    objective with ``budget.decode_monotone``), or with ``budget.decode_em`` iterations of :func:`decode_em`, or
    with ``budget.decode_sequential`` by :func:`decode_sequential`, or with ``budget.decode_beam`` by
    :func:`decode_beam` (that width, at most ``budget.decode_sweeps`` passes) instead; then, with
    ``budget.decode_swaps``, that many sweeps of :func:`refine_distinct` from the decoder's reading. Ids that do not
    occur keep the per-id ranking."""
    from aloe.attacks.scoring import IdGuess

    check_budget(t.budget)
    b = t.budget
    docs, labels = _victim_docs(t, guess, obf_prompts, obf_stream)
    lm = CausalLM(t.plain_dir)
    if b.decode_sequential:
        out = decode_sequential(lm, docs, labels, guess.candidates, b.decode_sweeps, b.decode_temperature,
                                b.rng("decode"), distinct=True, progress=progress)
        extra = {"search": "sequential", "sweeps": out["sweeps"], "temperature_per_sweep": out["temperature"],
                 "moved_per_sweep": out["moved"], "objective_per_sweep": out["objective"],
                 "rank_prior_top3": out["rank_prior"][:3], "rank_prior": out["rank_prior"]}
    elif b.decode_beam:
        out = decode_beam(lm, docs, labels, guess.candidates, b.decode_beam, b.decode_sweeps, progress=progress)
        extra = {"search": "beam", "beam_width": out["width"], "passes": out["passes"],
                 "start_objective": out["start_objective"], "objective_per_pass": out["objective"],
                 "beam_spread_per_pass": out["spread"], "moved_per_pass": out["moved"], "shared": out["shared"],
                 "rank_prior_top3": out["rank_prior"][:3], "rank_prior": out["rank_prior"]}
    elif b.decode_em:
        out = decode_em(lm, docs, labels, guess.candidates, b.decode_em, distinct=True, progress=progress)
        extra = {"search": "em", "iterations": out["iterations"], "loglik_per_iteration": out["loglik"],
                 "transition_pairs": out["transition_pairs"]}
    else:
        out = decode(lm, docs, labels, guess.candidates, b.decode_sweeps, distinct=True, monotone=b.decode_monotone,
                     progress=progress)
        extra = {"sweeps": out["sweeps"], "moved_per_sweep": out["moved"], "objective_per_sweep": out["objective"],
                 "monotone": b.decode_monotone, "search": "sweeps", "rank_prior_top3": out["rank_prior"][:3],
                 "rank_prior": out["rank_prior"]}
    extra = {"decoded_clusters": out["decoded_clusters"], "decoded_occurrences": int(len(labels)), **extra}
    if b.decode_swaps:
        ref = refine_distinct(lm, docs, labels, guess.candidates, out["candidates"][:, 0], b.decode_swaps,
                              b.rng("swaps"), progress=progress)
        out = ref
        # the rank prior the objective was raised with is the one-to-one search's (fitted against its start)
        extra.update({"search": extra["search"] + "+swaps", "swap_sweeps": ref["sweeps"],
                      "swap_start_objective": ref["start_objective"], "swap_moved_per_sweep": ref["moved"],
                      "swap_swapped_per_sweep": ref["swapped"], "swap_objective_per_sweep": ref["objective"],
                      "swap_best_objective": ref["best_objective"], "swap_shared_at_start": ref["shared_at_start"],
                      "swap_shared": ref["shared"], "rank_prior": ref["rank_prior"],
                      "rank_prior_top3": ref["rank_prior"][:3]})
    return IdGuess(guess.obf_ids, out["candidates"], uniform=guess.uniform, extra=extra)


def _victim_docs(t, guess, obf_prompts: list[np.ndarray], obf_stream: np.ndarray) -> tuple[list[Doc], np.ndarray]:
    """The docs :func:`attack` decodes: the prompts, then the first ``budget.decode_stream`` ids of the stream in
    chunks of 512; the clusters are the rows of ``guess``."""
    rows = {int(o): i for i, o in enumerate(guess.obf_ids)}
    stream, chunk = np.asarray(obf_stream)[:t.budget.decode_stream], 512
    streams = [*obf_prompts, *(stream[i:i + chunk] for i in range(0, len(stream), chunk))]
    return traffic_docs(streams, rows, t.fixed_ids)


def reading_logprobs(t, base, decoded, obf_prompts: list[np.ndarray], obf_stream: np.ndarray,
                     plain_of: np.ndarray, rank_prior: list[float] | None = None, from_victim_sweeps: int = 0,
                     rng: np.random.Generator | None = None, completion_sweeps: int = 0, progress=None) -> dict:
    """A measurement made with the secret, never part of the attack: how the decoder's objective ranks the readings
    of the traffic it decoded. ``base`` is the per-id guess whose candidates were decoded, ``decoded`` the decoder's
    guess, ``plain_of`` (V,) the plain id of every obfuscated id (the inverse of tau). Readings, one plain id per
    occurring cluster: ``first_choice`` (the base's first candidates), ``decoded`` (the decoder's choice),
    ``victim_within_candidates`` (the victim's token wherever it is among the candidates, the decoder's choice
    elsewhere: the most a decoder over these candidates can read, though not always one-to-one, since the decoder's
    choice can be another id's true token) and ``victim`` (the victim's text). For each: the public
    model's log-probability of the whole traffic so read (nats), the rank-prior term of the decoder's objective
    (``rank_prior`` of the sweeps search; None where a choice is not among the candidates) and the share of the
    decoded occurrences it reads right. If the reachable victim's reading scores below the decoder's, a better search
    of the same objective cannot read more.

    With ``from_victim_sweeps`` > 0, :func:`refine_distinct` also runs that many sweeps from the reachable victim's
    reading (made one-to-one), under the decoder's ``rank_prior`` (its own EM fit where there is none), and
    ``from_victim`` records its objective and the share of the decoded occurrences it reads right at the start,
    after each sweep and for the reading it returns: whether the victim's reading is a local optimum of the
    objective, or a search of it moves away from the victim's text (then the objective, not the search, bounds what
    the decoder reads).

    With ``completion_sweeps`` > 0, ``victim_completion`` records the same for the best one-to-one completion of the
    victim's reading: the ids whose victim token is among their candidates hold it (``held`` of
    :func:`refine_distinct`) and the search, from the decoder's choice, completes the others. If the completion
    scores below the decoder's reading, no one-to-one reading that reads every reachable victim token beats the
    decoder's under this objective, as far as this search finds."""
    docs, labels = _victim_docs(t, base, obf_prompts, obf_stream)
    cand = np.asarray(base.candidates, dtype=np.int64)
    truth = np.asarray(plain_of, dtype=np.int64)[np.asarray(base.obf_ids, dtype=np.int64)]
    dec = np.asarray(decoded.candidates, dtype=np.int64)[:, 0]
    inside = (cand == truth[:, None]).any(1)
    readings = {"first_choice": cand[:, 0], "decoded": dec, "victim_within_candidates": np.where(inside, truth, dec),
                "victim": truth}
    rows = np.unique(labels)
    lm = CausalLM(t.plain_dir)
    out = {}
    for name, plain in readings.items():
        rank = np.argmax(cand[rows] == plain[rows, None], 1)
        listed = (cand[rows] == plain[rows, None]).any(1)
        prior = (float(np.log(np.asarray(rank_prior))[rank].sum()) if rank_prior is not None and listed.all()
                 else None)
        lp = text_logprob(lm, docs, plain[labels])
        out[name] = {"text_logprob": lp, "rank_prior_logprob": prior,
                     "objective": None if prior is None else lp + prior,
                     "occurrences_right": float((plain[labels] == truth[labels]).mean()) if len(labels) else None}
    out["occurrences"] = int(len(labels))

    def search(sweeps: int, held: np.ndarray | None) -> dict:
        def right(plain: np.ndarray) -> float:
            return float((plain[labels] == truth[labels]).mean())

        per_sweep: list[float] = []
        ref = refine_distinct(lm, docs, labels, cand, readings["victim_within_candidates"], sweeps, rng,
                              prior=None if rank_prior is None else np.asarray(rank_prior),
                              on_sweep=lambda now: per_sweep.append(right(now)), held=held, progress=progress)
        return {"sweeps": ref["sweeps"], "start_objective": ref["start_objective"],
                "objective_per_sweep": ref["objective"], "best_objective": ref["best_objective"],
                "moved_per_sweep": ref["moved"], "swapped_per_sweep": ref["swapped"],
                "shared_at_start": ref["shared_at_start"], "shared": ref["shared"],
                "occurrences_right_start": per_sweep[0], "occurrences_right_per_sweep": per_sweep[1:],
                "occurrences_right": right(ref["candidates"][:, 0]), "rank_prior": ref["rank_prior"]}

    if from_victim_sweeps > 0 and len(labels):
        out["from_victim"] = search(from_victim_sweeps, None)
    if completion_sweeps > 0 and len(labels):
        out["victim_completion"] = search(completion_sweeps, inside)
    return out


def decode_linked(model_dir, lengths: list[int], labels: np.ndarray, cand: np.ndarray, progress=None) -> dict:
    """Client-held vocabulary: decode linked occurrence vectors (:func:`aloe.attacks.occurrence.attack_linked`'s
    ``labels`` and ``cluster_candidates``) sent in docs of consecutive ``lengths``, the public model as the language
    prior. Clusters may share a token (one token's occurrences can fall in two clusters). Returns the ranked
    candidates (m, k) of every occurrence and the decoder's record."""
    labels = np.asarray(labels, dtype=np.int64)
    if sum(lengths) != len(labels):
        raise AloeError("the doc lengths must add up to the number of occurrences")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    docs = [Doc.unknown(np.arange(s, s + n)) for s, n in zip(starts, lengths) if n]
    out = decode(CausalLM(model_dir), docs, labels, cand, progress=progress)
    return {"candidates": out["candidates"][labels], "sweeps": out["sweeps"], "moved_per_sweep": out["moved"],
            "rank_prior_top3": out["rank_prior"][:3], "decoded_clusters": out["decoded_clusters"]}
