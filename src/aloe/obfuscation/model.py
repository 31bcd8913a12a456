"""Whole-checkpoint conversion: stream each tensor of a plain checkpoint through the transform of its component and
write a *stock* Hugging Face folder (same architecture, hidden_size = d + 2h, explicit head_dim, untied embeddings,
tokenizer files unchanged) plus an ``aloe.json`` manifest, and the secret file apart.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from aloe import AloeError, __version__
from aloe.assets.cache import atomic_directory, atomic_write_json
from aloe.attacks.risk import measured_risk, profile_key
from aloe.obfuscation.architectures import ArchSpec, layer_types, rope_inv_freq, spec_for
from aloe.obfuscation.attention import obfuscate_attention, obfuscate_attention_f32
from aloe.obfuscation.checkpoint import DTYPES, CheckpointReader, ShardWriter, read_config
from aloe.obfuscation.embedding import (
    NOISE_SHAPES,
    obfuscate_embedding,
    obfuscate_head,
    table_rows_f32,
    vocab_permutation,
)
from aloe.obfuscation.ffn import obfuscate_ffn, obfuscate_ffn_f32
from aloe.obfuscation.keys import Float32Keys, KeyBases, init_keys
from aloe.obfuscation.moe import obfuscate_moe, obfuscate_moe_f32
from aloe.obfuscation.norm import SandwichKeys, calibrated_kappa, exact_kappa, scaled_eps
from aloe.obfuscation.profiles import Profile
from aloe.obfuscation.rng import SecureRandom, new_seed
from aloe.obfuscation.secret import Secret, load_secret, save_secret

MANIFEST = "aloe.json"
SKIP_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "aloe-asset.json", MANIFEST}


@dataclass
class Arch:
    model_type: str
    d: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    vocab: int
    eps: float
    tied: bool
    spec: ArchSpec | None = None
    n_experts: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    layer_types: tuple = ()

    def fused_parts(self) -> dict[str, list[tuple[str, int]]]:
        """The fused projections of every layer and their parts (see :meth:`ArchSpec.fused_parts`)."""
        if self.spec is None:
            return {}
        return self.spec.fused_parts(self.n_layers, self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.ffn)

    @classmethod
    def from_config(cls, c: dict) -> Arch:
        spec = spec_for(c.get("model_type"))
        try:
            d, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            n_kv = int(c.get("num_key_value_heads") or n_heads)
            head_dim = int(c.get("head_dim") or d // n_heads)
            n_layers = int(c["num_hidden_layers"])
            arch = cls(c["model_type"], d, n_layers, n_heads, n_kv, head_dim,
                       int(c["intermediate_size"]), int(c["vocab_size"]), float(c["rms_norm_eps"]),
                       bool(c.get("tie_word_embeddings", False)), spec,
                       layer_types=tuple(layer_types(c, n_layers)))
            if spec.moe is not None:
                arch.n_experts = int(next(c[f] for f in spec.n_experts_fields if c.get(f) is not None))
                arch.moe_ffn = int(c[spec.moe_ffn_field])
                arch.shared_ffn = int(c.get("shared_expert_intermediate_size") or 0) if spec.moe.shared else 0
        except (KeyError, TypeError, ValueError, StopIteration) as exc:
            raise AloeError(f"config.json lacks a usable field: {exc or 'number of experts'}") from None
        if n_heads % n_kv:
            raise AloeError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
        if head_dim % 2:
            raise AloeError(f"head_dim {head_dim} is odd; RoPE needs pairs")
        act = c.get(spec.act_field, spec.activations[0])
        if act not in spec.activations:
            raise AloeError(f"{spec.act_field} {act!r} is not supported for {spec.architecture} "
                            f"(gated FFN with {', '.join(spec.activations)})")
        return arch


def special_token_ids(model_dir: Path, config: dict) -> set[int]:
    """Ids that tau keeps fixed: BOS/EOS/PAD of the config and generation config, every special or added token of
    the tokenizer, and the padding rows beyond the tokenizer's vocabulary."""
    ids: set[int] = set()
    sources = [config]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            v = src.get(key)
            ids.update(v if isinstance(v, list) else [] if v is None else [v])
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        ids.update(_fast_tokenizer_special_ids(model_dir, int(config["vocab_size"])))
    elif (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids.update(int(i) for i in tok.all_special_ids)
        ids.update(int(i) for i in tok.added_tokens_decoder)
        ids.update(range(len(tok), int(config["vocab_size"])))
    return {int(i) for i in ids}


_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _fast_tokenizer_special_ids(model_dir: Path, vocab_size: int) -> set[int]:
    """The ids transformers' fast tokenizer calls special or added, read with the ``tokenizers`` library alone: every
    added token of tokenizer.json and of tokenizer_config.json's ``added_tokens_decoder``, the special tokens that
    tokenizer_config.json names, and the rows past the tokenizer's length. Loading the whole transformers tokenizer
    for this was 15% of a SmolLM2 conversion."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = {int(i) for i in tok.get_added_tokens_decoder()}
    length = tok.get_vocab_size(with_added_tokens=True)
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        names: list = [cfg.get(k) for k in _SPECIAL_TOKEN_KEYS]
        for k in ("additional_special_tokens", "extra_special_tokens"):
            extra = cfg.get(k) or []
            names.extend(extra.values() if isinstance(extra, dict) else extra)
        for name in names:
            name = name.get("content") if isinstance(name, dict) else name
            if isinstance(name, str) and (i := tok.token_to_id(name)) is not None:
                ids.add(int(i))
        for i in cfg.get("added_tokens_decoder") or {}:
            ids.add(int(i))
            length = max(length, int(i) + 1)
    ids.update(range(length, vocab_size))
    return ids


@dataclass
class Plan:
    """Everything secret that the conversion needs, derived from the master seed."""

    secret: Secret
    keys: KeyBases
    rng: SecureRandom
    embed_writer: np.ndarray
    head_reader: np.ndarray

    def attn_writers(self, layer: int, n_heads: int) -> list[np.ndarray]:
        r = self.rng.child(f"layer{layer}/attn/writers")
        return [self.keys.keymat_gen(r) for _ in range(n_heads)]

    def ffn_writer(self, layer: int) -> np.ndarray:
        return self.keys.keymat_gen(self.rng.child(f"layer{layer}/ffn/writer"))

    # the same writer keys in factored form (the float32 path): only their fresh parts, drawn as above
    def attn_writer_factors(self, layer: int, n_heads: int) -> list:
        r = self.rng.child(f"layer{layer}/attn/writers")
        return [self.keys.writer_factor(r) for _ in range(n_heads)]

    def ffn_writer_factor(self, layer: int):
        return self.keys.writer_factor(self.rng.child(f"layer{layer}/ffn/writer"))


def compatible_expansion(h: int, n_heads: int) -> int:
    """The even h' nearest to h (ties: the larger) with d + 2h' divisible by the head count whenever d is.

    Stock engines (transformers' config validation among them) insist that hidden_size be a multiple of
    num_attention_heads even when head_dim is explicit, so the expansion is rounded to keep the checkpoint loadable.
    """
    if h <= 0:
        return 0
    step = int(np.lcm(2, n_heads // np.gcd(2, n_heads)))  # 2h' = 0 mod n_heads and h' even
    lo = (h // step) * step
    hi = lo if lo == h else lo + step
    return hi if (hi - h) <= (h - lo) or lo == 0 else lo


def make_plan(seed: bytes, arch: Arch, profile: Profile, fixed_ids: set[int]) -> Plan:
    rng = SecureRandom(seed)
    tau = vocab_permutation(rng.child("vocab"), arch.vocab, fixed_ids)
    h = compatible_expansion(profile.h, arch.n_heads) if arch.d % arch.n_heads == 0 else profile.h
    if arch.spec is not None and arch.spec.sandwich:
        if profile.keys != "exact-norm" or profile.embed_shear:
            raise AloeError(f"{arch.spec.architecture} has post-sublayer norms: only the exact-norm keys without an "
                            "embedding shear are available (docs/aloepri.md, Gemma 3)")
        keys = SandwichKeys(rng.child("keys"), arch.d, h)
    else:
        keys = init_keys(rng.child("keys"), arch.d, h, design=profile.keys, lam=profile.lam,
                         sv_floor=profile.sv_floor)
    embed_writer = (keys.keymat_gen(rng.child("embed/writer")) if profile.embed_shear == 0
                    else keys.sheared_writer(rng.child("embed/writer"), profile.embed_shear))
    return Plan(Secret(seed, tau), keys, rng, embed_writer, keys.inv_keymat_gen(rng.child("head/reader")))


def calibrate_kappas(model_dir: Path, arch: Arch, plan: Plan, token_ids: np.ndarray) -> list[float]:
    """kappa per norm (2 per layer, then the final one) from real hidden states of the plain model.

    The obfuscated residual is rebuilt exactly as the obfuscated model forms it (each writer's output times its own
    key P), so the ratio ||x~|| / ||x|| is measured on the actual residual mixture, not on Gaussians.
    """
    import torch
    from transformers import AutoModelForCausalLM

    eager = {"experts_implementation": "eager"} if arch.spec.moe else {}  # grouped matmuls take no float64
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64, **eager).eval()
    layers = model.model.layers
    state = {"x~": None}
    plain_samples: list[list[np.ndarray]] = [[] for _ in range(2 * arch.n_layers + 1)]
    obf_samples: list[list[np.ndarray]] = [[] for _ in range(2 * arch.n_layers + 1)]
    hooks = []

    def flat(t):
        return t.detach().reshape(-1, t.shape[-1]).numpy()

    def on_embed(_m, _i, out):
        state["x~"] = flat(out) @ plan.embed_writer

    def norm_pre(k):
        def hook(_m, args):
            plain_samples[k].append(flat(args[0]))
            obf_samples[k].append(state["x~"].copy())
        return hook

    def on_o(layer):
        writers = plan.attn_writers(layer, arch.n_heads)
        o_w = layers[layer].self_attn.o_proj.weight.detach().numpy()
        bias = layers[layer].self_attn.o_proj.bias

        def hook(_m, args, _out):
            a = flat(args[0])
            hd = arch.head_dim
            for i in range(arch.n_heads):
                state["x~"] += (a[:, i * hd:(i + 1) * hd] @ o_w[:, i * hd:(i + 1) * hd].T) @ writers[i]
            if bias is not None:
                state["x~"] += bias.detach().numpy() @ writers[0]
        return hook

    def on_mlp(layer):
        P = plan.ffn_writer(layer)

        def hook(_m, _args, out):
            state["x~"] += flat(out) @ P
        return hook

    hooks.append(model.model.embed_tokens.register_forward_hook(on_embed))
    for layer, block in enumerate(layers):
        hooks.append(block.input_layernorm.register_forward_pre_hook(norm_pre(2 * layer)))
        hooks.append(block.self_attn.o_proj.register_forward_hook(on_o(layer)))
        pre_ffn = getattr(block, arch.spec.pre_ffn_norm)
        hooks.append(pre_ffn.register_forward_pre_hook(norm_pre(2 * layer + 1)))
        hooks.append(block.mlp.register_forward_hook(on_mlp(layer)))
    hooks.append(model.model.norm.register_forward_pre_hook(norm_pre(2 * arch.n_layers)))
    try:
        with torch.no_grad():
            for chunk in np.array_split(token_ids, max(1, len(token_ids) // 256)):
                model(torch.as_tensor(chunk[None, :], dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    return [calibrated_kappa(np.concatenate(p), np.concatenate(o)) for p, o in zip(plain_samples, obf_samples)]


def _source_summary(reader: CheckpointReader, model_dir: Path) -> dict:
    return {"path": str(Path(model_dir).resolve()), "sha256": reader.fingerprint()}


def obfuscate_checkpoint(model_dir: Path, out_dir: Path, secret_path: Path, profile: Profile, *,
                         seed_from_os: bool = False, dtype: str = "float32", max_shard_bytes: int = 2 << 30,
                         calibration_ids: np.ndarray | None = None, progress: bool = True,
                         adapt_token_ids: np.ndarray | None = None, adapt_options: dict | None = None) -> dict:
    """Convert ``model_dir`` into an obfuscated stock checkpoint at ``out_dir``; see the module docstring.

    The master seed comes from ``secret_path`` when it exists (the conversion is then reproducible), else fresh from
    the OS CSPRNG. ``seed_from_os`` insists on a fresh seed and refuses to overwrite an existing secret file (unless
    an interrupted adaptation made with that secret is waiting at ``OUT.partial``: it resumes).
    A profile with ``adapt_steps > 0`` converts into ``OUT.partial/base`` first, saves the secret, then distils
    (:mod:`aloe.obfuscation.adapt`, resumable from ``OUT.partial/adapt-state.pt``) and writes ``out_dir`` last.
    Returns the summary that is also stored (without secrets) in ``aloe.json``.
    """
    t0 = time.perf_counter()
    model_dir, out_dir, secret_path = Path(model_dir), Path(out_dir), Path(secret_path)
    if dtype not in DTYPES:
        raise AloeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if secret_path.resolve().is_relative_to(out_dir.resolve()):
        raise AloeError("the secret file must not be inside the output folder (the server would receive it)")
    config = read_config(model_dir)
    arch = Arch.from_config(config)
    reader = CheckpointReader(model_dir)
    fused = arch.fused_parts()
    reader.unfuse(fused)
    for name in fused:
        if name + ".bias" in reader:
            raise AloeError(f"tensor {name}.bias: biases on fused projections are not supported")
    source = _source_summary(reader, model_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")

    if secret_path.exists():
        existing = load_secret(secret_path)
        if seed_from_os and not _resumable(partial, existing):
            raise AloeError(f"secret file {secret_path} exists; --seed-from-os would replace a key that artifacts "
                            "may depend on; choose a new path")
        seed = existing.seed
    else:
        existing, seed = None, new_seed()

    if out_dir.exists():
        try:
            manifest = json.loads((out_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None
        same = (manifest is not None and existing is not None
                and manifest.get("secret_fingerprint") == existing.fingerprint
                and manifest.get("source", {}).get("sha256") == source["sha256"]
                and profile_key(manifest.get("profile") or {}) == profile_key(profile.to_dict())
                and manifest.get("dtype") == dtype)
        if same:
            return dict(manifest, reused=True, seconds=time.perf_counter() - t0)
        raise AloeError(f"output folder {out_dir} already exists and was not made from these inputs; "
                        "remove it or choose another path")

    plan = make_plan(seed, arch, profile, special_token_ids(model_dir, config))
    check_output_config(config, plan.keys.d_out, arch.head_dim)
    if existing is not None and not np.array_equal(existing.tau, plan.secret.tau):
        raise AloeError(f"secret file {secret_path} was made for another model or tokenizer (its tau differs)")
    if profile.noise_shape not in NOISE_SHAPES:
        raise AloeError(f"unknown noise shape {profile.noise_shape!r}; choose one of {', '.join(NOISE_SHAPES)}")

    d_out = plan.keys.d_out
    if profile.keys == "exact-norm":
        kappas = [exact_kappa(plan.keys.scale, arch.d, d_out)] * (2 * arch.n_layers + 1)
    else:
        if calibration_ids is None:
            raise AloeError("the paper key design needs calibration text (real hidden states) for kappa")
        kappas = calibrate_kappas(model_dir, arch, plan, calibration_ids)
    eps_out = scaled_eps(arch.eps, float(np.median(kappas)))
    inv_freq = {lt: rope_inv_freq(model_dir, arch.model_type, lt) for lt in set(arch.layer_types)}
    if any(len(f) != arch.head_dim // 2 for f in inv_freq.values()):
        raise AloeError("partial rotary embeddings are not supported")

    summary = {
        "format": "aloe-artifact-v1",
        "aloe_version": __version__,
        "architecture": config["architectures"][0],
        "profile": profile.to_dict(),
        "dtype": dtype,
        "hidden_size": arch.d, "obfuscated_hidden_size": d_out,
        "expansion": {"requested": profile.h, "effective": plan.keys.h},
        "kappa": {"min": float(min(kappas)), "max": float(max(kappas))},
        "rms_norm_eps": eps_out,
        "fixed_token_ids": int(np.sum(plan.secret.tau == np.arange(arch.vocab))),
        "residual_key": plan.keys.design,
        "secret_fingerprint": plan.secret.fingerprint,
        "measured_risk": measured_risk(profile.to_dict(), source_sha256=source["sha256"]),
        "source": source,
    }

    def convert(folder: Path, out_dtype: str, compute64: bool = False) -> None:
        steps = tqdm(total=arch.n_layers + 2, desc="obfuscate", unit="part", disable=not progress)
        shards = _write_weights(folder, reader, arch, plan, profile, kappas, inv_freq, out_dtype, max_shard_bytes,
                                steps, compute64)
        steps.close()
        _write_side_files(folder, model_dir, config, d_out, arch.head_dim, eps_out, out_dtype)
        atomic_write_json(folder / MANIFEST, dict(summary, dtype=out_dtype, shards=shards))

    if profile.adapt_steps <= 0:
        with atomic_directory(out_dir) as tmp:
            convert(tmp, dtype)
            summary["shards"] = json.loads((tmp / MANIFEST).read_text())["shards"]
            if existing is None:
                save_secret(secret_path, plan.secret)
        return dict(summary, reused=False, seconds=time.perf_counter() - t0, path=str(out_dir))

    from aloe.obfuscation.adapt import AdaptConfig, adapt_model

    base = partial / "base"
    if not _resumable(partial, plan.secret, profile, source):
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        with atomic_directory(base) as tmp:
            convert(tmp, "float32", compute64=dtype == "float64")  # a float64 artifact is computed in float64
    if existing is None:  # an interrupted adaptation must find the same key when it is run again
        save_secret(secret_path, plan.secret)
    cfg = AdaptConfig(steps=profile.adapt_steps, lr=profile.adapt_lr, rank=profile.adapt_rank,
                      **(adapt_options or {}))
    merged, stats = adapt_model(model_dir, base, plan.secret.tau, cfg, partial / "adapt-state.pt",
                                token_ids=adapt_token_ids, progress=progress)
    summary["adaptation"] = stats
    with atomic_directory(out_dir) as tmp:
        writer = ShardWriter(tmp, dtype, max_shard_bytes)
        for name, tensor in merged.state_dict().items():
            writer.add(name, tensor.detach().double().numpy())
        summary["shards"] = writer.close()
        _write_side_files(tmp, model_dir, config, d_out, arch.head_dim, eps_out, dtype)
        atomic_write_json(tmp / MANIFEST, summary)
    shutil.rmtree(partial, ignore_errors=True)
    return dict(summary, reused=False, seconds=time.perf_counter() - t0, path=str(out_dir))


def _resumable(partial: Path, secret: Secret, profile: Profile | None = None, source: dict | None = None) -> bool:
    """Whether ``partial`` holds a finished base conversion made with this secret (and, when given, this profile and
    source): an adaptation to resume."""
    try:
        manifest = json.loads((partial / "base" / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("secret_fingerprint") == secret.fingerprint
            and (profile is None or profile_key(manifest.get("profile") or {}) == profile_key(profile.to_dict()))
            and (source is None or manifest.get("source", {}).get("sha256") == source["sha256"]))


def _output_config(config: dict, d_out: int, head_dim: int, eps_out: float, dtype: str) -> dict:
    out_config = dict(config)
    out_config.update(hidden_size=d_out, head_dim=head_dim, tie_word_embeddings=False, rms_norm_eps=eps_out,
                      dtype=dtype)
    out_config.pop("torch_dtype", None)
    return out_config


def check_output_config(config: dict, d_out: int, head_dim: int) -> None:
    """Refuse, before any work, a model whose widened config transformers would not load (its config class
    validates it): e.g. Phi-3's longrope factors, which transformers checks against hidden_size / heads."""
    from transformers import AutoConfig

    out = _output_config(config, d_out, head_dim, float(config.get("rms_norm_eps", 1e-6)), "float32")
    try:
        AutoConfig.for_model(**out)
    except Exception as exc:   # the config classes raise ValueError and hub validation errors alike
        reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise AloeError(f"transformers would not load the obfuscated config (hidden size {d_out}): {reason}") from None


def _write_side_files(folder: Path, model_dir: Path, config: dict, d_out: int, head_dim: int, eps_out: float,
                      dtype: str) -> None:
    out_config = _output_config(config, d_out, head_dim, eps_out, dtype)
    (folder / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    for f in Path(model_dir).iterdir():
        if f.is_file() and f.name not in SKIP_FILES and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy2(f, folder / f.name)


def _write_weights(folder: Path, reader: CheckpointReader, arch: Arch, plan: Plan, profile: Profile,
                   kappas: list[float], inv_freq: dict, dtype: str, max_shard_bytes: int, steps,
                   compute64: bool = False) -> list[str]:
    """Stream every tensor through its transform into the shards: read, transform, write and free, one tensor at a
    time (the vocabulary tables in blocks of rows).

    A float64 output is computed in float64 numpy, as it always was (byte for byte the same artifact for a secret).
    Any narrower output takes the float32 path: the factored keys (:class:`aloe.obfuscation.keys.Float32Keys`) and
    float32 torch GEMMs, with the same secrets; docs/aloepri.md ("Conversion speed and memory") gives its error."""
    spec, d, d_out = arch.spec, arch.d, plan.keys.d_out
    writer = FusingWriter(ShardWriter(folder, dtype, max_shard_bytes), arch.fused_parts())
    fast = None if dtype == "float64" or compute64 else Float32Keys(plan.keys)
    # q_norm/k_norm share the config's rms_norm_eps, which the residual norms scale by kappa^2 (median over norms)
    qk_gain = float(np.median(kappas))
    P_embed = plan.embed_writer
    if spec.embed_scale:  # the engine scales by sqrt(hidden_size) in the deployment dtype: sqrt(d) must stay
        P_embed = P_embed * (torch.tensor(d ** 0.5, dtype=DTYPES[dtype]).item()
                             / torch.tensor(d_out ** 0.5, dtype=DTYPES[dtype]).item())
    if fast is not None:
        writer.add_rows("model.embed_tokens.weight", (arch.vocab, d_out), table_rows_f32(
            reader.tensor("model.embed_tokens.weight", (arch.vocab, d)), plan.secret.tau, P_embed,
            alpha=profile.alpha_e, rng=plan.rng.child("embed/noise"), noise_shape=profile.noise_shape))
    else:
        embed = reader.get("model.embed_tokens.weight", (arch.vocab, d))
        writer.add("model.embed_tokens.weight", obfuscate_embedding(
            embed, plan.secret.tau, P_embed, profile.alpha_e, plan.rng.child("embed/noise"), profile.noise_shape))
        del embed
    steps.update(1)
    for layer in range(arch.n_layers):
        p = f"model.layers.{layer}."
        for name, tensor in _attention(reader, arch, plan, profile, kappas[2 * layer], layer,
                                       inv_freq[arch.layer_types[layer]], qk_gain, fast):
            writer.add(p + name, tensor)
        gamma = spec.norm_multiplier(reader.get(p + spec.pre_ffn_norm + ".weight", (d,)))
        writer.add(p + spec.pre_ffn_norm + ".weight", spec.norm_stored(kappas[2 * layer + 1], d_out))
        if spec.moe is not None and p + spec.moe.router in reader:
            tensors = (_moe_f32 if fast is not None else _moe)(reader, arch, plan, profile, gamma, layer, fast)
        else:
            tensors = _dense_mlp(reader, arch, plan, profile, gamma, layer, "mlp", arch.ffn, fast)
        for name, tensor in tensors:
            writer.add(p + name, tensor)
        if spec.post_ffn_norm:
            writer.add(p + spec.post_ffn_norm + ".weight", _post_norm(reader, arch, plan, p + spec.post_ffn_norm))
        steps.update(1)
    final_norm = spec.norm_multiplier(reader.get("model.norm.weight", (d,)))
    head_name = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    if head_name != "lm_head.weight" and not arch.tied:
        raise AloeError("tensor lm_head.weight is missing and the config does not tie the embeddings")
    writer.add("model.norm.weight", spec.norm_stored(kappas[-1], d_out))
    if fast is not None:
        writer.add_rows("lm_head.weight", (arch.vocab, d_out), table_rows_f32(
            reader.tensor(head_name, (arch.vocab, d)), plan.secret.tau, plan.head_reader.T, multiplier=final_norm,
            alpha=profile.alpha_h, rng=plan.rng.child("head/noise"), noise_shape=profile.noise_shape))
    else:
        head = reader.get(head_name, (arch.vocab, d))
        writer.add("lm_head.weight", obfuscate_head(head, final_norm, plan.secret.tau, plan.head_reader,
                                                    profile.alpha_h, plan.rng.child("head/noise"),
                                                    profile.noise_shape))
    shards = writer.close()
    steps.update(1)
    return shards


class FusingWriter:
    """A :class:`ShardWriter` for architectures that store some projections fused (Phi-3's ``qkv_proj`` and
    ``gate_up_proj``): the transforms give each part under its own name, and the fused tensor is written, its parts
    stacked by rows in the architecture's order, once the last of them has come. Everything else passes through."""

    def __init__(self, writer: ShardWriter, parts: dict[str, list[tuple[str, int]]]) -> None:
        self.writer = writer
        self.order = {fused + ".weight": [p + ".weight" for p, _ in blocks] for fused, blocks in parts.items()}
        self.owner = {part: fused for fused, names in self.order.items() for part in names}
        self.held: dict[str, dict] = {}

    def add(self, name: str, array) -> None:
        fused = self.owner.get(name)
        if fused is None:
            self.writer.add(name, array)
            return
        got = self.held.setdefault(fused, {})
        got[name] = array
        if len(got) == len(self.order[fused]):
            parts = [got[n] for n in self.order[fused]]
            del self.held[fused]
            if any(isinstance(x, torch.Tensor) for x in parts):
                self.writer.add(fused, torch.cat([torch.as_tensor(x) for x in parts]))
            else:
                self.writer.add(fused, np.concatenate(parts))

    def add_rows(self, name: str, shape: tuple[int, ...], chunks) -> None:
        self.writer.add_rows(name, shape, chunks)

    def close(self) -> list[str]:
        if self.held:
            raise AloeError(f"fused tensors left incomplete: {', '.join(sorted(self.held))}")
        return self.writer.close()


def _biases(reader: CheckpointReader, prefix: str, sizes: dict[str, int], w: dict) -> dict:
    """Add the optional ``{name}_bias`` tensors of ``prefix{name}_proj.bias`` to ``w``."""
    for name, n in sizes.items():
        if f"{prefix}{name}_proj.bias" in reader:
            w[f"{name}_bias"] = reader.get(f"{prefix}{name}_proj.bias", (n,))
    return w


def _post_norm(reader: CheckpointReader, arch: Arch, plan: Plan, name: str) -> np.ndarray:
    """A post-sublayer norm (sandwich keys only): its weight follows the plain coordinate every slot carries."""
    g = arch.spec.norm_multiplier(reader.get(name + ".weight", (arch.d,)))
    kappa = exact_kappa(plan.keys.scale, arch.d, plan.keys.d_out)
    return arch.spec.norm_stored(plan.keys.post_norm_multiplier(g, kappa), plan.keys.d_out)


def _attention(reader: CheckpointReader, arch: Arch, plan: Plan, profile: Profile, kappa: float, layer: int,
               inv_freq: np.ndarray, qk_gain: float, fast: Float32Keys | None = None):
    spec, d, hd, d_out = arch.spec, arch.d, arch.head_dim, plan.keys.d_out
    p = f"model.layers.{layer}.self_attn."
    q_n, kv_n = arch.n_heads * hd, arch.n_kv * hd
    qk_norm = None
    if spec.qk_norm:
        qk_norm = tuple(spec.norm_multiplier(reader.get(p + f"{n}_norm.weight", (hd,))) for n in ("q", "k"))
    gamma = spec.norm_multiplier(reader.get(f"model.layers.{layer}.input_layernorm.weight", (d,)))
    if fast is not None:
        return _attention_f32(reader, arch, plan, profile, kappa, layer, inv_freq, qk_gain, fast, qk_norm, gamma)
    w = {
        "q": reader.get(p + "q_proj.weight", (q_n, d)),
        "k": reader.get(p + "k_proj.weight", (kv_n, d)),
        "v": reader.get(p + "v_proj.weight", (kv_n, d)),
        "o": reader.get(p + "o_proj.weight", (d, q_n)),
    }
    _biases(reader, p, {"q": q_n, "k": kv_n, "v": kv_n, "o": d}, w)
    attn = obfuscate_attention(
        w, gamma, n_heads=arch.n_heads, n_kv=arch.n_kv, head_dim=hd, keys=plan.keys,
        rng=plan.rng.child(f"layer{layer}/attn"), inv_freq=inv_freq, beta=profile.beta,
        gamma_bp=profile.gamma, qk_scale=profile.qk_scale, vo_spread=profile.vo_spread,
        writer_keys=plan.attn_writers(layer, arch.n_heads), qk_norm=qk_norm,
        qk_gain=qk_gain if qk_norm is not None else 1.0)
    out = [("input_layernorm.weight", spec.norm_stored(kappa, d_out))]
    for name in ("q", "k", "v", "o"):
        out.append((f"self_attn.{name}_proj.weight", attn[name]))
        if f"{name}_bias" in attn:
            out.append((f"self_attn.{name}_proj.bias", attn[f"{name}_bias"]))
    if qk_norm is not None:
        out += [(f"self_attn.{n}_norm.weight", spec.norm_stored(attn[f"{n}_norm"], hd)) for n in ("q", "k")]
    if spec.post_attn_norm:
        name = f"model.layers.{layer}.{spec.post_attn_norm}"
        out.append((spec.post_attn_norm + ".weight", _post_norm(reader, arch, plan, name)))
    return out


def _lazy(reader: CheckpointReader, prefix: str, names: dict[str, str], shapes: dict[str, tuple]):
    """``get(key)`` for the float32 transforms: weight ``key`` as a torch tensor, ``key_bias`` as float64 numpy or
    None, each read from the checkpoint when asked for."""
    def get(key: str):
        if key.endswith("_bias"):
            name = f"{prefix}{names[key[:-5]]}.bias"
            return reader.get(name, (shapes[key[:-5]][0],)) if name in reader else None
        return reader.tensor(f"{prefix}{names[key]}.weight", shapes[key])
    return get


def _attention_f32(reader, arch, plan, profile, kappa, layer, inv_freq, qk_gain, fast, qk_norm, gamma):
    spec, d, hd, d_out = arch.spec, arch.d, arch.head_dim, plan.keys.d_out
    q_n, kv_n = arch.n_heads * hd, arch.n_kv * hd
    yield "input_layernorm.weight", spec.norm_stored(kappa, d_out)
    get = _lazy(reader, f"model.layers.{layer}.self_attn.", {n: f"{n}_proj" for n in "qkvo"},
                {"q": (q_n, d), "k": (kv_n, d), "v": (kv_n, d), "o": (d, q_n)})
    for key, tensor in obfuscate_attention_f32(
            get, gamma, n_heads=arch.n_heads, n_kv=arch.n_kv, head_dim=hd, keys=plan.keys, fast=fast,
            rng=plan.rng.child(f"layer{layer}/attn"), writer_factors=plan.attn_writer_factors(layer, arch.n_heads),
            inv_freq=inv_freq, beta=profile.beta, gamma_bp=profile.gamma, qk_scale=profile.qk_scale,
            vo_spread=profile.vo_spread, qk_norm=qk_norm, qk_gain=qk_gain if qk_norm is not None else 1.0):
        if key.endswith("_norm"):
            yield f"self_attn.{key}.weight", spec.norm_stored(tensor, hd)
        else:
            yield f"self_attn.{key[0]}_proj.{'bias' if key.endswith('_bias') else 'weight'}", tensor
    if spec.post_attn_norm:
        name = f"model.layers.{layer}.{spec.post_attn_norm}"
        yield spec.post_attn_norm + ".weight", _post_norm(reader, arch, plan, name)


def _ffn_weights(reader: CheckpointReader, prefix: str, names: tuple[str, str, str], d: int, n: int) -> dict:
    gate, up, down = names
    w = {"gate": reader.get(f"{prefix}{gate}.weight", (n, d)), "up": reader.get(f"{prefix}{up}.weight", (n, d)),
         "down": reader.get(f"{prefix}{down}.weight", (d, n))}
    return _biases(reader, prefix, {"gate": n, "up": n, "down": d}, w)


def _ffn_tensors(prefix: str, names: tuple[str, str, str], ffn: dict) -> list[tuple[str, np.ndarray]]:
    out = []
    for key, name in zip(("gate", "up", "down"), names):
        out.append((f"{prefix}{name}.weight", ffn[key]))
        if f"{key}_bias" in ffn:
            out.append((f"{prefix}{name}.bias", ffn[f"{key}_bias"]))
    return out


DENSE_PROJ = ("gate_proj", "up_proj", "down_proj")


def _ffn_f32(reader, prefix, names, d, n, gamma, plan, fast, rng, scale, writer_factor, out_prefix):
    get = _lazy(reader, prefix, dict(zip(("gate", "up", "down"), names)), {"gate": (n, d), "up": (n, d),
                                                                          "down": (d, n)})
    which = dict(zip(("gate", "up", "down"), names))
    for key, tensor in obfuscate_ffn_f32(get, gamma, n, keys=plan.keys, fast=fast, rng=rng, scale=scale,
                                         writer_factor=writer_factor):
        yield f"{out_prefix}{which[key.split('_')[0]]}.{'bias' if key.endswith('_bias') else 'weight'}", tensor


def _dense_mlp(reader: CheckpointReader, arch: Arch, plan: Plan, profile: Profile, gamma: np.ndarray, layer: int,
               module: str, n: int, fast: Float32Keys | None = None):
    p = f"model.layers.{layer}.{module}."
    if fast is not None:
        return _ffn_f32(reader, p, DENSE_PROJ, arch.d, n, gamma, plan, fast, plan.rng.child(f"layer{layer}/ffn"),
                        profile.ffn_scale, plan.ffn_writer_factor(layer), f"{module}.")
    w = _ffn_weights(reader, p, DENSE_PROJ, arch.d, n)
    ffn = obfuscate_ffn(w, gamma, keys=plan.keys, rng=plan.rng.child(f"layer{layer}/ffn"), scale=profile.ffn_scale,
                        writer_key=plan.ffn_writer(layer))
    return _ffn_tensors(f"{module}.", DENSE_PROJ, ffn)


def _moe(reader: CheckpointReader, arch: Arch, plan: Plan, profile: Profile, gamma: np.ndarray,
         layer: int, fast=None) -> list[tuple[str, np.ndarray]]:
    names, d, p = arch.spec.moe, arch.d, f"model.layers.{layer}."
    experts = [_ffn_weights(reader, f"{p}{names.expert.format(e=e)}.", names.proj, d, arch.moe_ffn)
               for e in range(arch.n_experts)]
    shared = shared_gate = None
    if names.shared:
        shared = _ffn_weights(reader, f"{p}{names.shared}.", DENSE_PROJ, d, arch.shared_ffn)
        shared_gate = reader.get(p + names.shared_gate, (1, d))
    moe = obfuscate_moe(experts, reader.get(p + names.router, (arch.n_experts, d)), gamma, keys=plan.keys,
                        rng=plan.rng.child(f"layer{layer}/moe"), scale=profile.ffn_scale,
                        writer_key=plan.ffn_writer(layer), shared=shared, shared_gate=shared_gate)
    out = [(names.router, moe["router"])]
    for slot, ffn in enumerate(moe["experts"]):
        out += _ffn_tensors(f"{names.expert.format(e=slot)}.", names.proj, ffn)
    if shared is not None:
        out += _ffn_tensors(f"{names.shared}.", DENSE_PROJ, moe["shared"])
        out.append((names.shared_gate, moe["shared_gate"]))
    return out


def _moe_f32(reader: CheckpointReader, arch: Arch, plan: Plan, profile: Profile, gamma: np.ndarray, layer: int,
             fast: Float32Keys):
    """The float32 path of :func:`_moe`, one expert at a time."""
    names, d, p = arch.spec.moe, arch.d, f"model.layers.{layer}."

    def expert(e):
        return _lazy(reader, f"{p}{names.expert.format(e=e)}.", dict(zip(("gate", "up", "down"), names.proj)),
                     {"gate": (arch.moe_ffn, d), "up": (arch.moe_ffn, d), "down": (d, arch.moe_ffn)})
    shared = shared_gate = None
    if names.shared:
        shared = _lazy(reader, f"{p}{names.shared}.", dict(zip(("gate", "up", "down"), DENSE_PROJ)),
                       {"gate": (arch.shared_ffn, d), "up": (arch.shared_ffn, d), "down": (d, arch.shared_ffn)})
        shared_gate = reader.tensor(p + names.shared_gate, (1, d))
    for item in obfuscate_moe_f32(
            expert, arch.n_experts, arch.moe_ffn, reader.tensor(p + names.router, (arch.n_experts, d)), gamma,
            keys=plan.keys, fast=fast, rng=plan.rng.child(f"layer{layer}/moe"), scale=profile.ffn_scale,
            writer_factor=plan.ffn_writer_factor(layer), shared=shared, shared_ffn=arch.shared_ffn,
            shared_gate=shared_gate):
        if item[0] == "router":
            yield names.router, item[1]
        elif item[0] == "shared_gate":
            yield names.shared_gate, item[1]
        else:
            where, key, tensor = item
            module, proj = (names.shared, DENSE_PROJ) if where == "shared" else (names.expert.format(e=where),
                                                                                  names.proj)
            which = dict(zip(("gate", "up", "down"), proj))
            yield f"{module}.{which[key.split('_')[0]]}.{'bias' if key.endswith('_bias') else 'weight'}", tensor
