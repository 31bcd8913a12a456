"""IMA, a learned inversion model (InvBERT-style; design notes section 4).

**Own-keys (the realistic attacker).** The attacker does not know the victim's keys, but the mechanism and the
profile are public (``aloe.json``). It obfuscates the plain model *itself* with a key it draws, runs public text
through its own obfuscated model, and trains an inverter (a 2-layer transformer encoder with 8 heads, as in the
paper) from internal states to plain token ids. Raw hidden states do not transfer between keys, so the inverter
reads only key-invariant features of every layer's hidden state: its norm relative to the sequence's mean norm, its
cosine with the previous position and with the first position (all preserved when the writer key is a scaled
isometry). The trained inverter is then applied to the victim's states.

**Known-plaintext (stronger, labelled as such).** The attacker also holds the victim's own obfuscated hidden states
for public text whose plaintext it knows (for instance a public document a user pasted). It fits a ridge regression
from the raw obfuscated hidden state entering layer ``budget.isa_layer`` to the plain embedding of the token and
decodes by nearest neighbour over the full vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe import AloeError
from aloe.attacks.common import Target, load_causal_lm, nearest
from aloe.attacks.scoring import SeqGuess


def load(path):
    return load_causal_lm(path)


@torch.no_grad()
def hidden(model, ids: np.ndarray) -> list[torch.Tensor]:
    out = model.model(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True)
    return [h[0] for h in out.hidden_states]


def invariant_features(hs: list[torch.Tensor]) -> torch.Tensor:
    feats = []
    for h in hs:
        n = h.norm(dim=-1)
        hn = torch.nn.functional.normalize(h, dim=-1)
        prev = torch.cat([torch.ones(1), (hn[1:] * hn[:-1]).sum(-1)])
        first = hn @ hn[0]
        feats += [torch.log(n / n.mean()), prev, first]
    return torch.stack(feats, -1)


class Inverter(torch.nn.Module):
    def __init__(self, n_in: int, n_vocab: int, width: int = 128, heads: int = 8, layers: int = 2, max_len: int = 512):
        super().__init__()
        self.inp = torch.nn.Linear(n_in, width)
        self.pos = torch.nn.Embedding(max_len, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers)
        self.out = torch.nn.Linear(width, n_vocab)

    def forward(self, x):
        pos = self.pos(torch.arange(x.shape[1]))[None]
        return self.out(self.enc(self.inp(x) + pos))


def own_profile(t: Target, adapt: bool = True):
    """The artifact's public profile as a :class:`~aloe.obfuscation.profiles.Profile`: every field ``aloe.json``
    records is passed through (lists back to tuples). ``adapt=False`` drops the profile's fine-tuning
    (``adapt_steps`` 0): the client's expensive step, which an attacker building many copies may skip."""
    from aloe.obfuscation.profiles import Profile

    prof = {k: tuple(v) if isinstance(v, list) else v for k, v in t.profile.items()}
    if not adapt and int(prof.get("adapt_steps", 0) or 0) > 0:
        prof["adapt_steps"] = 0
    try:
        return Profile(**prof)
    except TypeError as exc:
        raise AloeError(f"{t.obf_dir}/aloe.json: its profile does not fit this aloe version ({exc})") from None


def own_obfuscation(t: Target, draw: int = 0, adapt: bool = True) -> tuple[Path, np.ndarray]:
    """The attacker's own artifact of the plain model, with the public profile and a key it drew itself (built once
    per plain model, profile and draw number, and kept in the cache: it is the attacker's asset, unrelated to the
    victim's key). ``draw`` k > 0 builds the k-th further copy, with its own key and noise; ``adapt`` as in
    :func:`own_profile`."""
    from aloe.assets.cache import cache_root
    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.secret import load_secret

    if draw < 0:
        raise AloeError(f"own copy number {draw} is negative")
    profile = own_profile(t, adapt)
    ident = [t._plain.fingerprint(), profile.to_dict()] + ([draw] if draw else [])
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
    folder = cache_root() / "attacks" / "own" / key.hexdigest()[:20]
    out, sec = folder / "artifact", folder / "attacker-secret.json"
    if not (out / "aloe.json").is_file():
        calib = None
        if profile.keys == "paper":
            calib = _calibration(t)
        folder.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        obfuscate_checkpoint(t.plain_dir, out, sec, profile, dtype="float32", calibration_ids=calib, progress=False)
    return out, load_secret(sec).tau


def _calibration(t: Target) -> np.ndarray:
    """Calibration text for the paper keys' kappa: the public held-out text when the model has a tokenizer, else
    (tiny test models) the attacker's own uniform draw of movable ids."""
    if (t.plain_dir / "tokenizer.json").is_file() or (t.plain_dir / "tokenizer_config.json").is_file():
        from aloe.obfuscation.commands import calibration_ids

        return calibration_ids(t.plain_dir)
    return t.budget.rng("own-calibration").choice(t.movable_ids, size=512)


def _chunks(ids: np.ndarray, T: int) -> list[np.ndarray]:
    return [ids[i:i + T] for i in range(0, len(ids) - T + 1, T)]


def attack(t: Target, public_ids: np.ndarray, vocab_seqs: list[np.ndarray], prompt_seqs: list[np.ndarray],
           victim_known: tuple[list[np.ndarray], list[np.ndarray]] | None = None, progress=None) -> dict:
    """Returns ``{"ima": SeqGuess (own keys), "ima_known_plaintext": SeqGuess}`` (the latter when pairs given)."""
    b = t.budget
    show = progress is not None
    g = torch.Generator().manual_seed(int(b.rng("ima").integers(1 << 62)))
    victim = load(t.obf_dir)
    results = {}
    own_dir, own_tau = own_obfuscation(t)
    own = load(own_dir)
    chunks = _chunks(public_ids[: b.ima_tokens], b.seq_len)
    X = torch.stack([invariant_features(hidden(own, own_tau[c])) for c in
                     tqdm(chunks, desc="ima/features", disable=not show, leave=False)])
    Y = torch.as_tensor(np.stack(chunks))
    mu, sd = X.mean((0, 1)), X.std((0, 1)).clamp_min(1e-6)
    inv = Inverter(X.shape[-1], t.arch.vocab)
    opt = torch.optim.AdamW(inv.parameters(), lr=2e-3)
    for _ in tqdm(range(b.ima_steps), desc="ima/train", disable=not show, leave=False):
        idx = torch.randint(0, len(X), (min(32, len(X)),), generator=g)
        loss = torch.nn.functional.cross_entropy(inv((X[idx] - mu) / sd).flatten(0, 1), Y[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    inv.eval()

    def predict(seq):
        with torch.no_grad():
            f = (invariant_features(hidden(victim, seq)) - mu) / sd
            return inv(f[None])[0].topk(b.topk, -1).indices.numpy()

    results["ima"] = SeqGuess([predict(s) for s in vocab_seqs], [predict(s) for s in prompt_seqs],
                              {"variant": "own keys, key-invariant features", "train_tokens": int(Y.numel()),
                               "steps": b.ima_steps, "final_loss": float(loss.detach())})

    if victim_known is not None:
        L = max(0, min(b.isa_layer, t.arch.n_layers))
        E = t.plain_embed
        obf_seqs, plain_seqs = victim_known
        Xk = torch.cat([hidden(victim, s)[L] for s in obf_seqs])
        Yk = E[torch.as_tensor(np.concatenate(plain_seqs))]
        Xc = torch.cat([Xk, torch.ones(len(Xk), 1)], 1)
        lam = 1e-2 * float((Xc * Xc).sum(1).mean())
        W = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(Xc.shape[1]), Xc.T @ Yk)

        def decode(seq):
            h = hidden(victim, seq)[L]
            return nearest(torch.cat([h, torch.ones(len(h), 1)], 1) @ W, E, b.topk, metric="cos").numpy()

        results["ima_known_plaintext"] = SeqGuess([decode(s) for s in vocab_seqs], [decode(s) for s in prompt_seqs],
                                                  {"variant": "known plaintext (victim's own states)", "layer": L,
                                                   "known_tokens": int(len(Yk))})
    return results
