"""What the attacker holds, loaded once: plain and obfuscated weights (float32 torch), the public profile of the
artifact, the fixed (public) special ids, and the shared nearest-neighbour and signature helpers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from aloe import AloeError
from aloe.obfuscation.checkpoint import CheckpointReader, read_config
from aloe.obfuscation.model import Arch, special_token_ids


@dataclass
class Budget:
    """Knobs that bound the cost of every attack (tests use tiny values; see ``docs/attacks.md``)."""

    queries: int = 0            # obfuscated ids attacked by the per-id attacks (0 = the whole vocabulary)
    layers: int = 0             # layers used by VMA/IA (0 = all), spread evenly over the depth
    columns: int = 256          # random columns/units per product row (VMA)
    quantiles: int = 16         # order statistics kept per sorted row
    topk: int = 10              # candidates kept per guess
    seq_len: int = 16           # ISA/IMA sequence length
    sequences: int = 4          # ISA/IMA evaluation sequences of random vocabulary ids
    isa_steps: int = 60
    isa_layer: int = 1
    isa_shortlist: int = 256   # tokens tried exactly per position (ISA)
    ima_tokens: int = 4096      # public training tokens for the inverter
    ima_steps: int = 300
    tfma_tokens: int = 20000    # length of the victim's obfuscated prompt stream
    sda_steps: int = 2000       # training steps of the SDA translator
    sda_ranks: int = 1024       # frequency ranks SDA encodes one by one (rarer ids: buckets by count)
    behaviour_rows: int = 0     # single-token contexts per side for the output side (0 = the queries)
    behaviour_queries: int = 0  # ids given an input-side pass (0 = the queries)
    learned_steps: int = 400    # training steps of the learned matcher
    learned_state_ids: int = 0  # attacked ids (and own-copy rows) given a forward pass for the states block (0 = all)
    learned_draws: int = 2      # own copies the learned matcher trains on (the last one validates when there are 2+)
    anchored_contexts: int = 1024  # contexts of fixed ids run on each side (anchored logit matching)
    anchored_rounds: int = 2       # bootstrap rounds that promote the best-matched ids to anchors
    decode_stream: int = 2000      # ids of the victim's stream decoded besides its prompts (decoded)
    decode_sweeps: int = 8         # most sweeps of the decoder's search (it stops early once nothing moves)
    decode_monotone: bool = False  # keep a sweep's moves only where they raise the decoder's objective
    decode_em: int = 0             # EM iterations of the bigram forward-backward decoder instead of the sweeps (0: off)
    decode_sequential: bool = False  # decode one cluster at a time (Gibbs sampling with annealing) instead
    decode_temperature: float = 1.0  # start temperature of the sequential search (0: greedy at every sweep)
    decode_beam: int = 0           # width of a beam search over one-to-one readings instead (0: off); its passes are
    #                                at most decode_sweeps
    decode_swaps: int = 0          # sweeps of the one-to-one search (moves and swaps) after the decoder's (0: off)
    decode_from_victim: int = 0    # not the attack's: with the secret, after it, the one-to-one search's sweeps from
    #                                the victim's reachable reading (0: off)
    decode_completion: int = 0     # not the attack's: with the secret, after it, the one-to-one search's sweeps that
    #                                complete the victim's reading around the ids whose token is among their candidates
    keyreg_rounds: int = 3         # rounds of fit and read of the key regression (it stops once nothing changes)
    keyreg_start: str = "learned"  # the per-id attack whose first choices start the key regression
    batch: int = 256
    seed: int | None = None     # attacker's own (non-secret) randomness; None = fresh

    def rng(self, label: str = "") -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng([self.seed, sum(label.encode())])


@dataclass
class Target:
    """The attacker's view of one deployment."""

    plain_dir: Path
    obf_dir: Path
    budget: Budget = field(default_factory=Budget)
    # plain ids of the attacker's prior corpus (public text of the victim's kind); used where the server holds only
    # the obfuscated rows it was sent (client-held vocabulary), to compare like with like
    prior_plain_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.plain_dir, self.obf_dir = Path(self.plain_dir), Path(self.obf_dir)
        self.config = read_config(self.plain_dir)
        self.arch = Arch.from_config(self.config)
        try:
            self.manifest = json.loads((self.obf_dir / "aloe.json").read_text())
        except FileNotFoundError:
            raise AloeError(f"{self.obf_dir} is not an aloe artifact (no aloe.json)") from None
        except (OSError, ValueError) as exc:
            raise AloeError(f"{self.obf_dir}/aloe.json is unreadable: {exc}") from None
        self.obf_config = read_config(self.obf_dir)
        self.client_held = bool(self.manifest.get("client_held_vocabulary"))
        obf_vocab = self.manifest.get("vocab_size") if self.client_held else self.obf_config["vocab_size"]
        if int(obf_vocab) != self.arch.vocab:
            raise AloeError("the obfuscated model's vocabulary differs from the plain model's")
        self._plain = CheckpointReader(self.plain_dir)
        self._obf = CheckpointReader(self.obf_dir)
        for reader in (self._plain, self._obf):   # fused projections (Phi-3) read as their parts, on both sides
            reader.unfuse(self.arch.fused_parts())

    # ---- public facts -------------------------------------------------------------------------------------------
    @property
    def profile(self) -> dict:
        return self.manifest.get("profile", {})

    @cached_property
    def fixed_ids(self) -> np.ndarray:
        """Ids the mechanism leaves in place (public: the tokenizer's special tokens and padding rows)."""
        return np.array(sorted(special_token_ids(self.plain_dir, self.config)), dtype=np.int64)

    @cached_property
    def movable_ids(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.arch.vocab), self.fixed_ids)

    # ---- weights ------------------------------------------------------------------------------------------------
    def plain(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._plain.get(name)).float()

    def obf(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._obf.get(name)).float()

    def _norm_gain(self, name: str) -> torch.Tensor:
        """What the engine multiplies a normalised vector by, given the stored norm weight ``name`` (Gemma's
        norms multiply by 1 + w)."""
        spec = self.arch.spec
        return self.plain(name) + (float(spec.norm_offset) if spec is not None else 0.0)

    def _embed_gain(self, width: int) -> float:
        """The engine's factor on the embedding of a model ``width`` wide: sqrt(width) where the architecture scales
        it (Gemma), else 1. Both tables are read as the first layer receives them: the conversion keeps
        ``E~ sqrt(d') = E sqrt(d) P``, so only these products, not the stored rows, are related by the key."""
        spec = self.arch.spec
        return float(width) ** 0.5 if spec is not None and spec.embed_scale else 1.0

    @cached_property
    def plain_embed(self) -> torch.Tensor:
        E = self.plain("model.embed_tokens.weight")
        gain = self._embed_gain(E.shape[1])
        return E * gain if gain != 1.0 else E

    @cached_property
    def plain_head(self) -> torch.Tensor:
        """The plain LM head with the final norm's gamma folded in, as the mechanism does before obfuscating."""
        name = "lm_head.weight" if "lm_head.weight" in self._plain else "model.embed_tokens.weight"
        return self.plain(name) * self._norm_gain("model.norm.weight")[None, :]

    def _obf_table(self, name: str) -> torch.Tensor:
        """An obfuscated table as the server holds it: all zeros when the client keeps the vocabulary."""
        table = self.obf(name)
        return torch.zeros(self.arch.vocab, table.shape[1]) if self.client_held else table

    @cached_property
    def obf_embed(self) -> torch.Tensor:
        table = self._obf_table("model.embed_tokens.weight")
        gain = self._embed_gain(table.shape[1])
        return table * gain if gain != 1.0 else table

    @cached_property
    def obf_head(self) -> torch.Tensor:
        return self._obf_table("lm_head.weight")

    # ---- a server that holds only some obfuscated rows (client-held vocabulary: the rows it was sent) -----------
    @cached_property
    def held_rows(self) -> torch.Tensor:
        """Which obfuscated embedding rows the server holds (all of them, unless the client keeps the tables)."""
        return self.obf_embed.abs().sum(1) > 0

    @cached_property
    def head_held(self) -> bool:
        return bool(self.obf_head.abs().sum() > 0)

    @cached_property
    def plain_population(self) -> torch.Tensor:
        """The plain rows whose statistics match those of the held obfuscated rows: every row, or, when the server
        holds only the rows it was sent, the tokens of the attacker's prior corpus (the same kind of text)."""
        if bool(self.held_rows.all()) or self.prior_plain_ids is None:
            return torch.ones(self.arch.vocab, dtype=torch.bool)
        mask = torch.zeros(self.arch.vocab, dtype=torch.bool)
        mask[torch.as_tensor(np.unique(self.prior_plain_ids))] = True
        return mask

    def no_claim_on_unheld(self, q_ids: np.ndarray, cand: torch.Tensor) -> torch.Tensor:
        """Candidates of -1 (no claim) for attacked ids whose row the server never held."""
        cand = cand.clone()
        cand[~self.held_rows[torch.as_tensor(q_ids)]] = -1
        return cand

    def plain_layer(self, layer: int, name: str) -> torch.Tensor:
        """A plain projection of a layer, HF layout, with its input RMSNorm gamma folded in where the mechanism
        folds it (q, k, v, gate, up)."""
        p = f"model.layers.{layer}."
        w = self.plain(p + name + ".weight")
        spec = self.arch.spec
        if name.startswith("self_attn.") and name != "self_attn.o_proj":
            w = w * self._norm_gain(p + "input_layernorm.weight")[None, :]
        elif name in ("mlp.gate_proj", "mlp.up_proj"):
            ffn_norm = spec.pre_ffn_norm if spec is not None else "post_attention_layernorm"
            w = w * self._norm_gain(p + ffn_norm + ".weight")[None, :]
        return w

    def has_weight(self, name: str) -> bool:
        """Whether both the plain and the obfuscated checkpoint hold tensor ``name``."""
        return name in self._plain and name in self._obf

    def obf_layer(self, layer: int, name: str) -> torch.Tensor:
        return self.obf(f"model.layers.{layer}.{name}.weight")

    def layer_subset(self) -> list[int]:
        n, k = self.arch.n_layers, self.budget.layers
        if k <= 0 or k >= n:
            return list(range(n))
        return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})

    def query_ids(self, must: np.ndarray | None = None, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The obfuscated ids attacked: every movable id, or a uniform sample of them plus ``must`` (the ids the
        server received). Also returns the mask of the uniform sample, over which full-vocabulary recovery is
        estimated."""
        movable = self.movable_ids
        q = self.budget.queries if size is None else size
        if q <= 0 or q >= len(movable):
            return movable, np.ones(len(movable), dtype=bool)
        pick = self.budget.rng("queries").choice(movable, size=q, replace=False)
        ids = np.union1d(pick, np.intersect1d(must, movable)) if must is not None else np.sort(pick)
        return ids, np.isin(ids, pick)

    def noised_plain(self, w: torch.Tensor, alpha: float, label: str) -> torch.Tensor:
        """The attacker imitates the mechanism's public noise level with its own draws (matches the spread of the
        observed products; the draws themselves are unrelated to the victim's)."""
        if alpha <= 0:
            return w
        from aloe.obfuscation.embedding import noise_std

        std = torch.from_numpy(noise_std(w.double().numpy(), alpha, self.profile.get("noise_shape", "entry"))).float()
        g = torch.Generator().manual_seed(int(self.budget.rng(label).integers(1 << 62)))
        return w + std[:, None] * torch.randn(w.shape, generator=g)


# ---- shared numerics --------------------------------------------------------------------------------------------
def row_quantiles(x: torch.Tensor, q: int) -> torch.Tensor:
    """Evenly spaced order statistics of each row (a permutation-invariant row signature)."""
    s, _ = torch.sort(x, dim=1)
    idx = torch.linspace(0, x.shape[1] - 1, q).round().long()
    return s[:, idx]


def column_normalise(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Divide each column by its root mean square over the rows (tokens), or over the rows selected by ``rows``. A
    secret per-column scale (the FFN unit scales H_ffn, the q/k pair scales H_qk) multiplies a whole column, so this
    removes it before rows are sorted."""
    ref = x if rows is None else x[rows]
    return x / ref.pow(2).mean(0, keepdim=True).sqrt().clamp_min(1e-12)


def standardise(plain: torch.Tensor, obf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both feature blocks by the plain block's column statistics, and the block to unit total variance."""
    mu, sd = plain.mean(0, keepdim=True), plain.std(0, keepdim=True).clamp_min(1e-12)
    p, o = (plain - mu) / sd, (obf - mu) / sd
    w = 1.0 / np.sqrt(max(1, plain.shape[1]))
    return p * w, o * w


def nearest(queries: torch.Tensor, table: torch.Tensor, k: int, metric: str = "l2", batch: int = 2048
            ) -> torch.Tensor:
    """Indices of the ``k`` nearest table rows for each query row (exact search, in batches)."""
    k = min(k, table.shape[0])
    if metric == "cos":
        table = torch.nn.functional.normalize(table, dim=1)
        queries = torch.nn.functional.normalize(queries, dim=1)
        tn = None
    else:
        tn = (table * table).sum(1)
    out = []
    for s in range(0, queries.shape[0], batch):
        q = queries[s:s + batch]
        score = q @ table.T
        if tn is not None:
            score = 2 * score - tn[None, :]
        out.append(score.topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.long)


def pca_project(plain: torch.Tensor, obf: torch.Tensor, dim: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Project both feature sets on the top principal axes of the plain set (the attacker's own data), fitted on a
    sample of at most 8,192 plain rows (drawn with ``generator`` when given)."""
    if plain.shape[1] <= dim:
        return plain, obf
    mu = plain.mean(0, keepdim=True)
    sample = plain[torch.randperm(plain.shape[0], generator=generator)[:8192]] - mu
    _, _, v = torch.linalg.svd(sample, full_matrices=False)
    basis = v[:dim].T
    return (plain - mu) @ basis, (obf - mu) @ basis


def load_causal_lm(path: Path, **kwargs):
    """A stock float32 model from ``path``. A client-held-vocabulary server artifact gets both tables back at the
    full vocabulary size, all zeros: the model as its server holds it, so attacks can run it on any id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()
    try:
        manifest = json.loads((Path(path) / "aloe.json").read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("client_held_vocabulary"):
        model.resize_token_embeddings(int(manifest["vocab_size"]), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight.zero_()
            model.get_output_embeddings().weight.zero_()
    return model
