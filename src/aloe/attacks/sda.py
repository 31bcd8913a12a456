"""SDA, sequence decipherment (Aldarrab & May, EMNLP'21; the paper's Table 4; design notes section 4).

A ciphertext-only attack on the fixed substitution cipher that token-id serving is: the server reads nothing but the
obfuscated ids it receives, and a public corpus of the victim's kind of text.

1. *Recurrence encoding.* Each obfuscated id is replaced by a code that depends only on how often it occurs in the
   observed traffic, so it is the same whatever the permutation: its frequency rank (competition rank: ids seen
   equally often share it) for the ``ranks`` most frequent ids, else one of a few buckets by raw count (seen once,
   twice, ...). Ids the mechanism leaves in place are seen in clear and share one code.
2. *Translator.* A Transformer encoder (the whole traffic is seen, so it reads both sides of a position) maps a
   sequence of codes to plain tokens. The server trains it on its own corpus: bootstrap samples of the corpus of the
   traffic's size (pieces drawn with replacement, so the ranks move as they would between samples), encoded the same
   way, paired with their plain tokens.
3. *Per-id guess.* The cipher is fixed, so every occurrence of one obfuscated id is one plain token: the translator's
   log-probabilities over all of an id's occurrences are summed, and the top-k plain tokens of that sum are its
   candidates; the first choices are made one-to-one (:func:`aloe.attacks.decoding.distinct_assignment`).

Ids never seen in the traffic get no guess. The plain tokens the translator can output are those of the server's
corpus (a token the corpus lacks cannot be read from frequencies). TFMA is the same attack without the context.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aloe import AloeError
from aloe.attacks.scoring import IdGuess

RARE = 8       # count buckets below the ranked ids: seen 1, 2, ..., RARE or more times
PIECE = 64     # corpus tokens drawn together when the server bootstraps a traffic sample
LENGTH = 64    # positions the translator reads at once
BATCH = 32
LR = 3e-3


def frequency_codes(traffic: np.ndarray, n: int, ranks: int, fixed: np.ndarray) -> np.ndarray:
    """(n,) the recurrence code of every id from its count in ``traffic``: the competition rank (how many ids occur
    more often) when below ``ranks``, else ``ranks + min(count, RARE) - 1``; fixed ids (seen in clear) ``clear``;
    ids that never occur ``clear + 1`` (the padding code, never read)."""
    traffic = np.asarray(traffic, dtype=np.int64)
    counts = np.bincount(traffic, minlength=n)[:n]
    counts[fixed] = 0
    desc = np.sort(counts)[::-1]
    more = np.searchsorted(-desc, -counts, side="left")       # ids with a strictly larger count
    code = np.where(more < ranks, more, ranks + np.minimum(counts, RARE) - 1)
    clear, pad = ranks + RARE, ranks + RARE + 1
    code[counts == 0] = pad
    code[fixed] = clear
    return code


class Translator(nn.Module):
    """Codes -> plain-token classes, a bidirectional Transformer encoder."""

    def __init__(self, n_codes: int, n_classes: int, dim: int = 128, layers: int = 3, heads: int = 4):
        super().__init__()
        self.code = nn.Embedding(n_codes, dim)
        self.before = nn.Embedding(n_codes, dim)   # the code of the position before (and after): the bigrams
        self.after = nn.Embedding(n_codes, dim)    # an encoder would otherwise have to find by attention
        self.pos = nn.Embedding(LENGTH, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, codes: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        pad_code = self.code.num_embeddings - 1
        edge = torch.full_like(codes[:, :1], pad_code)
        x = (self.code(codes) + self.before(torch.cat([edge, codes[:, :-1]], 1))
             + self.after(torch.cat([codes[:, 1:], edge], 1)) + self.pos(torch.arange(codes.shape[1]))[None])
        return self.out(self.norm(self.encoder(x, src_key_padding_mask=pad)))


def bootstrap(corpus: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A traffic-sized sample of the corpus: pieces of ``PIECE`` tokens drawn with replacement."""
    starts = rng.integers(0, max(1, len(corpus) - PIECE + 1), size=-(-size // PIECE))
    return np.concatenate([corpus[s:s + PIECE] for s in starts])[:size]


def windows(length: int) -> list[int]:
    """Starts of the ``LENGTH``-long windows, half overlapping, that cover a sequence of ``length``."""
    if length <= LENGTH:
        return [0]
    starts = list(range(0, length - LENGTH + 1, LENGTH // 2))
    return starts if starts[-1] == length - LENGTH else [*starts, length - LENGTH]


def train(corpus: np.ndarray, size: int, n: int, fixed: np.ndarray, ranks: int, steps: int,
          rng: np.random.Generator, progress=None, dim: int = 128, layers: int = 3
          ) -> tuple[Translator, np.ndarray, dict]:
    """Train the translator (width ``dim``, ``layers`` deep) on bootstrap samples of ``corpus`` (plain ids) of
    ``size`` tokens. Returns it, the plain id of each class and the training record."""
    corpus = np.asarray(corpus, dtype=np.int64)
    classes = np.setdiff1d(np.unique(corpus), fixed)
    if len(corpus) < LENGTH or len(classes) < 2:
        raise AloeError(f"SDA needs a corpus of at least {LENGTH} tokens and two movable tokens")
    cls = -np.ones(n, dtype=np.int64)
    cls[classes] = np.arange(len(classes))
    with torch.random.fork_rng():
        torch.manual_seed(int(rng.integers(1 << 62)))
        model = Translator(ranks + RARE + 2, len(classes), dim, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=max(1, steps), pct_start=0.1)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        sample = bootstrap(corpus, max(size, LENGTH), rng)
        code = frequency_codes(sample, n, ranks, fixed)
        starts = rng.integers(0, len(sample) - LENGTH + 1, size=BATCH)
        ids = np.stack([sample[s:s + LENGTH] for s in starts])
        x = torch.as_tensor(code[ids])
        y = torch.as_tensor(np.where(np.isin(ids, fixed), -100, cls[ids]))
        logits = model(x, torch.zeros_like(x, dtype=torch.bool))
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return model, classes, {"final_loss": float(np.mean(tail)) if tail else float("nan"), "classes": int(len(classes))}


@torch.no_grad()
def id_scores(model: Translator, code: np.ndarray, sequences: list[np.ndarray], n: int
              ) -> tuple[np.ndarray, torch.Tensor]:
    """Per obfuscated id that occurs in ``sequences``: the translator's log-probabilities summed over its
    occurrences (every window that covers a position votes). Returns the ids and their (m, classes) scores."""
    ids = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    row = -np.ones(n, dtype=np.int64)
    row[ids] = np.arange(len(ids))
    score = torch.zeros(len(ids), model.out.out_features)
    pad_code = model.code.num_embeddings - 1
    chunks = [s[i:i + LENGTH] for s in sequences for i in windows(len(s))]
    for b in range(0, len(chunks), 256):
        part = chunks[b:b + 256]
        x = np.full((len(part), LENGTH), pad_code, dtype=np.int64)
        obf = np.zeros((len(part), LENGTH), dtype=np.int64)     # the obfuscated id at each position
        pad = np.ones((len(part), LENGTH), dtype=bool)
        for i, c in enumerate(part):
            x[i, :len(c)], obf[i, :len(c)], pad[i, :len(c)] = code[c], c, False
        lp = torch.log_softmax(model(torch.as_tensor(x), torch.as_tensor(pad)), -1)
        score.index_add_(0, torch.as_tensor(row[obf[~pad]]), lp[torch.as_tensor(~pad)])
    return ids, score


def attack(traffic: list[np.ndarray], corpus: np.ndarray, n: int, fixed: np.ndarray, ranks: int = 1024,
           steps: int = 2000, k: int = 10, rng: np.random.Generator | None = None, progress=None,
           dim: int = 128, layers: int = 3) -> IdGuess:
    """SDA on the traffic the server received (obfuscated id sequences: the victim's stream and prompts), with the
    server's ``corpus`` (plain ids of the same kind of text) to train on. Every movable id is attacked; those that do
    not occur get no candidate (-1)."""
    from aloe.attacks.decoding import distinct_assignment

    if ranks < 1 or steps < 0:
        raise AloeError(f"SDA needs ranks >= 1 and steps >= 0 (got {ranks}, {steps})")
    traffic = [np.asarray(s, dtype=np.int64) for s in traffic if len(s)]
    if not traffic:
        raise AloeError("SDA needs some traffic")
    rng = np.random.default_rng() if rng is None else rng
    fixed = np.asarray(fixed, dtype=np.int64)
    allids = np.concatenate(traffic)
    model, classes, info = train(corpus, len(allids), n, fixed, ranks, steps, rng, progress, dim, layers)
    code = frequency_codes(allids, n, ranks, fixed)
    ids, score = id_scores(model, code, traffic, n)
    movable_seen = ~np.isin(ids, fixed)
    ids, score = ids[movable_seen], score[torch.as_tensor(movable_seen)]
    kk = min(k, len(classes))
    top, j = score.topk(kk, dim=1)
    cand_seen = classes[j.numpy()]
    choice = distinct_assignment(top.double().numpy(), cand_seen, np.ones_like(cand_seen, dtype=bool))
    rows = np.arange(len(ids))
    first = cand_seen[rows, choice]
    rest = np.array([np.concatenate([[f], c[c != f]])[:kk] for f, c in zip(first, cand_seen)]).reshape(-1, kk)
    movable = np.setdiff1d(np.arange(n), fixed)
    cand = -np.ones((len(movable), k), dtype=np.int64)
    cand[np.searchsorted(movable, ids), :kk] = rest
    return IdGuess(movable, cand, {"traffic_tokens": int(len(allids)), "distinct_ids_seen": int(len(ids)),
                                   "corpus_tokens": int(len(corpus)), "steps": steps, "ranks": ranks, **info})
