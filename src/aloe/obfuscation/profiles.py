"""Named working points of the obfuscation.

Every parameter is documented here; the measured fidelity of each profile is in the README (produced by
``benchmarks/obfuscation_fidelity.py``).

- ``keys``: ``exact-norm`` (shared writer key with P P^T = c^2 I: the stock RMSNorm commutes exactly) or ``paper``
  (B = U + lambda V with a fresh C per writer; kappa calibrated on real hidden states; approximate norm).
- ``h``: expansion; the deployed hidden size is d + 2h.
- ``lam``: lambda of the paper's B = U + lambda V (``paper`` keys only).
- ``sv_floor``: the h non-isometric singular values of B lie in [sv_floor * c, c) (``exact-norm`` keys only).
- ``alpha_e`` / ``alpha_h``: noise on the embedding / LM head, in units of each matrix's own standard deviation.
- ``beta`` / ``gamma``: block-permutation window and temperature (beta = 1: no block permutation).
- ``qk_scale``, ``ffn_scale``: ranges of the per-pair q/k scales H_qk and the per-unit FFN scales H_ffn.
- ``vo_spread``: singular values of U_vo lie in [1/spread, spread].
- ``noise_shape``: ``entry`` (one sigma for the whole table, the paper's) or ``row`` (each row's own RMS, the same
  signal-to-noise ratio for every token); see :func:`aloe.obfuscation.embedding.noise_std`.
- ``embed_shear``: a secret non-isometric shear of the embedding's writer key, in units of the row norm (0: the shared
  writer key). Exact as a linear map (every reader still inverts it); the stock RMSNorm becomes approximate.
- ``adapt_steps``: distillation steps after the noise (0: none); ``adapt_lr``, ``adapt_rank``: learning rate and LoRA
  rank of that fine-tuning (:mod:`aloe.obfuscation.adapt`).
- ``protects``: one plain sentence on what the profile protects against, printed by ``aloe obfuscate``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from aloe import AloeError
from aloe.obfuscation.embedding import NOISE_SHAPES
from aloe.obfuscation.keys import DESIGNS


@dataclass(frozen=True)
class Profile:
    name: str
    keys: str = "exact-norm"
    h: int = 128
    lam: float = 0.3
    sv_floor: float = 0.5
    alpha_e: float = 0.0
    alpha_h: float = 0.0
    beta: int = 1
    gamma: float = 1e3
    qk_scale: tuple[float, float] = (0.95, 1.05)
    ffn_scale: tuple[float, float] = (0.95, 1.05)
    vo_spread: float = 2.0
    noise_shape: str = "entry"
    embed_shear: float = 0.0
    adapt_steps: int = 0
    adapt_lr: float = 1e-3
    adapt_rank: int = 8
    description: str = ""
    protects: str = ""

    def __post_init__(self) -> None:
        """Refuse a working point the obfuscation cannot mean (one line naming the parameter), before any work."""
        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo or v > hi \
                    or (lo_open and v == lo):
                bound = f"> {lo}" if lo_open else f">= {lo}"
                raise AloeError(f"profile parameter {name} must be a finite number {bound}"
                                + (f" and <= {hi}" if hi != math.inf else "") + f", got {v!r}")

        if self.keys not in DESIGNS:
            raise AloeError(f"profile parameter keys must be one of {', '.join(DESIGNS)}, got {self.keys!r}")
        if self.noise_shape not in NOISE_SHAPES:
            raise AloeError(f"profile parameter noise_shape must be one of {', '.join(NOISE_SHAPES)}, "
                            f"got {self.noise_shape!r}")
        for name in ("h", "beta", "adapt_steps", "adapt_rank"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise AloeError(f"profile parameter {name} must be an integer, got {getattr(self, name)!r}")
        number("h", 0)
        number("beta", 1)
        number("adapt_steps", 0)
        number("adapt_rank", 1)
        for name in ("lam", "alpha_e", "alpha_h", "embed_shear"):
            number(name, 0.0)
        number("sv_floor", 0.0, 1.0, lo_open=True)
        number("gamma", 0.0, lo_open=True)
        number("adapt_lr", 0.0, lo_open=True)
        number("vo_spread", 1.0)
        for name in ("qk_scale", "ffn_scale"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi < math.inf):
                raise AloeError(f"profile parameter {name} must be a range 0 < low <= high, got {(lo, hi)!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["qk_scale"] = list(self.qk_scale)
        d["ffn_scale"] = list(self.ffn_scale)
        return d

    def with_overrides(self, **kw) -> Profile:
        unknown = set(kw) - set(self.__dataclass_fields__)
        if unknown:
            raise AloeError(f"unknown profile parameter(s): {', '.join(sorted(unknown))}")
        kw.setdefault("protects", "")  # the base profile's sentence does not speak for other parameters
        return replace(self, name=kw.pop("name", "custom"), **kw)


PROFILES: dict[str, Profile] = {
    "exact": Profile(
        name="exact", keys="exact-norm", h=128, alpha_e=0.0, alpha_h=0.0, beta=1,
        description="no noise, no block permutation, exact-norm keys: equal to the plain model up to float rounding. "
                    "It proves fidelity; it is NOT private against a server that runs the model.",
        protects="only in part a passive observer of the traffic, who sees permuted token ids yet reads 28-37% "
                 "of the prompt tokens by their frequencies and neighbours (SDA; the more text of the victim's kind "
                 "it trains on, the more it reads); a server holding the public model reads the whole vocabulary "
                 "(VMA, IA, NN, and the key read off the body's weights).",
    ),
    "paper": Profile(
        name="paper", keys="paper", h=128, lam=0.3, alpha_e=1.0, alpha_h=0.2, beta=8, gamma=1e3,
        description="the paper's default working point (lambda 0.3, h 128, alpha_e 1.0, alpha_h 0.2, beta 8, "
                    "gamma 1e3) with its approximate norm; small models lose accuracy at alpha_e = 1.0.",
        protects="only the table attacks' first readings (on SmolLM2 at the full attack budget NN 0%, IA 1.2%, "
                 "VMA 2.3%): the key read off the body's own weights reads 99.996% of the vocabulary and every "
                 "token of real prompts with nothing read first, the key fitted on IA's reading 99.99% with no "
                 "copy trained (key regression), the learned matcher 59-67%, at a cost that destroys a small model "
                 "(SmolLM2: perplexity x130-220).",
    ),
    "balanced": Profile(
        name="balanced", keys="exact-norm", h=128, sv_floor=0.5, alpha_e=0.0, alpha_h=0.0, beta=8, gamma=1e5,
        description="our default: exact-norm keys (no norm error), vocabulary/head/FFN permutations and secret "
                    "scales, block permutation of the low RoPE frequencies (beta 8, gamma 1e5), no noise. Chosen "
                    "from measurements on SmolLM2-135M: greedy decoding already diverges at alpha_e 0.003 / alpha_h "
                    "0.0015, while the lightest noise measured against the attacks (alpha_e 0.01, already past that "
                    "point) still leaves IA and NN at 100%. The weight attacks (VMA, IA, NN) recover this profile's "
                    "vocabulary: see the README. It keeps the model exact; it is not private against the server.",
        protects="only in part a passive observer of the traffic, who sees permuted token ids yet reads 28-37% "
                 "of the prompt tokens by their frequencies and neighbours (SDA; the more text of the victim's kind "
                 "it trains on, the more it reads); a server holding the public model reads the whole vocabulary "
                 "(VMA, IA, NN, and the key read off the body's weights).",
    ),
    "private": Profile(
        name="private", keys="exact-norm", h=128, sv_floor=0.5, alpha_e=0.6, alpha_h=0.25, noise_shape="row",
        beta=8, gamma=1e5, adapt_steps=200, adapt_lr=2e-3, adapt_rank=16,
        description="privacy first: row-shaped noise (alpha_e 0.6 on the embedding, alpha_h 0.25 on the head, each "
                    "row at the same signal-to-noise ratio), then 200 steps of distillation from the plain model "
                    "(LoRA rank 16 on every projection + the norms, merged back; the noisy tables stay frozen). "
                    "About 25 minutes on a 2-core CPU for SmolLM2. Chosen from the measured frontier in "
                    "docs/attacks.md; on SmolLM2-135M it does NOT reach the fidelity goal.",
        protects="not against a server that holds the public model: on SmolLM2 at the full attack budget the key "
                 "read off the body's own weights reads 99.98% of the vocabulary with nothing read first, the key "
                 "fitted on VMA's reading 99.996%, the learned matcher 99% (IA 18%, VMA 22%, NN 0.01%), a passive "
                 "observer of the traffic 29% of the prompt tokens (SDA), and perplexity doubles (see the README).",
    ),
}

DEFAULT_PROFILE = "balanced"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise AloeError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None
