"""ISA, internal-state inversion (Dong et al.; design notes section 4).

The server records, for each sequence it serves, the obfuscated hidden state entering layer ``L`` and the attention
probabilities of layers ``< L``. It then optimises candidate input embeddings through the *plain* model (truncated
to L layers) so that the plain model's states match; the candidate input of each position is a softmax over the
vocabulary (a relaxed one-hot mixing plain embedding rows), decoded by its largest weights.
Only key-invariant quantities are compared, since the attacker does not know the keys:

- attention probabilities, each observed head against its closest plain head (the head permutation is unknown);
- for every layer up to L, the cosine Gram matrix of the hidden states across positions and each position's norm
  relative to its embedding norm (invariant when the writer key is a scaled isometry, as in the exact-norm design;
  approximate for the paper's keys).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe.attacks.common import Target, load_causal_lm
from aloe.attacks.scoring import SeqGuess


def load_eager(path, n_layers: int | None = None):
    model = load_causal_lm(path, attn_implementation="eager")
    if n_layers is not None:
        model.model.layers = model.model.layers[:n_layers]
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def states(model, L: int, input_ids=None, inputs_embeds=None):
    """(hidden states entering layers 0..L, attention probabilities of layers < L), batched."""
    grabbed = {}

    def hook(_m, _a, out):
        grabbed["h"] = out[0] if isinstance(out, tuple) else out

    h = model.model.layers[L - 1].register_forward_hook(hook)
    try:
        out = model.model(input_ids=input_ids, inputs_embeds=inputs_embeds, output_attentions=True,
                          output_hidden_states=True)
    finally:
        h.remove()
    return list(out.hidden_states[:L]) + [grabbed["h"]], list(out.attentions[:L])


def invariants(hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-invariant views of batched hidden states (B, T, d) of every layer: cosine Gram matrices across positions,
    and each position's norm relative to its norm at the embedding layer (the key scale cancels)."""
    base = hs[0].norm(dim=-1)
    G = torch.stack([torch.nn.functional.normalize(h, dim=-1) @ torch.nn.functional.normalize(h, dim=-1).transpose(1, 2)
                     for h in hs], 1)
    N = torch.stack([h.norm(dim=-1) / base for h in hs[1:]], 1) if len(hs) > 1 else base[:, None] * 0
    return G, N


def state_loss(hs, att, G_o, N_o, att_o) -> torch.Tensor:
    """Per batch element: attention (each observed head against its closest candidate head), Gram and norm terms."""
    G, N = invariants(hs)
    loss = ((G - G_o) ** 2).mean((1, 2, 3)) + ((N - N_o) ** 2).mean((1, 2))
    for p, o in zip(att, att_o):
        d = ((o[:, :, None] - p[:, None]) ** 2).mean((-1, -2))      # (B, observed head, candidate head)
        loss = loss + d.min(2).values.mean(1)
    return loss


def invert(plain, E: torch.Tensor, L: int, hs_obs, att_obs, steps: int, k: int, shortlist: int) -> np.ndarray:
    """Relaxed search, then exact greedy decoding left to right.

    1. Optimise a relaxed one-hot input (a softmax over the vocabulary per position, fed as the mixture of plain
       embedding rows) against the observed invariants; its ranking gives each position a shortlist.
    2. Causal attention makes a prefix's states independent of later tokens, so positions are decided in order:
       every shortlisted token (the whole vocabulary when it is small) is tried after the decoded prefix and scored
       exactly on the prefix's invariants; the ``k`` best are kept.
    """
    T, n = hs_obs[0].shape[1], E.shape[0]
    G_o, N_o = invariants(hs_obs)
    z = torch.zeros(T, n, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        hs, att = states(plain, L, inputs_embeds=(torch.softmax(z, -1) @ E)[None])
        state_loss(hs, att, G_o, N_o, att_obs).sum().backward()
        opt.step()
    z = z.detach()
    decoded: list[int] = []
    out = np.zeros((T, min(k, n)), dtype=np.int64)
    for t in range(T):
        cand = torch.arange(n) if shortlist >= n else z[t].topk(shortlist).indices
        losses = []
        for s in range(0, len(cand), 256):
            c = cand[s:s + 256]
            ids = torch.cat([torch.as_tensor(decoded, dtype=torch.long).repeat(len(c), 1), c[:, None]], 1)
            with torch.no_grad():
                hs, att = states(plain, L, inputs_embeds=E[ids])
                losses.append(state_loss(hs, att, G_o[:, :, :t + 1, :t + 1], N_o[:, :, :t + 1],
                                         [a[:, :, :t + 1, :t + 1] for a in att_obs]))
        order = torch.cat(losses).argsort()[:out.shape[1]]
        out[t, :len(order)] = cand[order].numpy()
        decoded.append(int(cand[order[0]]))
    return out


def attack(t: Target, vocab_seqs: list[np.ndarray], prompt_seqs: list[np.ndarray], progress=None) -> SeqGuess:
    b = t.budget
    L = max(1, min(b.isa_layer, t.arch.n_layers))
    plain = load_eager(t.plain_dir, L)
    obf = load_eager(t.obf_dir, L)
    E = t.plain_embed
    preds = []
    for seq in tqdm(vocab_seqs + prompt_seqs, desc="isa", disable=progress is None, leave=False):
        with torch.no_grad():
            hs_obs, att_obs = states(obf, L, input_ids=torch.as_tensor(seq)[None])
        preds.append(invert(plain, E, L, hs_obs, att_obs, b.isa_steps, b.topk, b.isa_shortlist))
    nv = len(vocab_seqs)
    return SeqGuess(preds[:nv], preds[nv:], {"layer": L, "steps": b.isa_steps, "shortlist": b.isa_shortlist})
