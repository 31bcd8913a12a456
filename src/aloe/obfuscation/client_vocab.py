"""The client-held vocabulary deployment: the server runs the obfuscated transformer without its two vocabulary
tables; the client keeps them beside tau.

Behavioural matching works because a server that holds the whole model can run it on any token id and read the
output distribution over ids; the table attacks (VMA, IA, NN) need the embedding or the head. Here neither is on
the server:

- the **server artifact** is the obfuscated stock checkpoint with ``embed_tokens`` and ``lm_head`` cut to a single
  zero row (``vocab_size`` 1, no tokenizer): stock transformers still loads it, and drives it with ``inputs_embeds``,
  returning the final (normed) hidden states, d' floats per position;
- the **client file** (mode 0600, beside the secret) holds both tables, the end-of-sequence ids and the deployment's
  per-occurrence noise. The client looks up its rows, adds fresh noise to every occurrence when the deployment asks
  for it (so identical tokens no longer send identical vectors), sends them, and applies the head to what comes back:
  n x d' multiply-adds per generated token (28 M for SmolLM2).

Without occurrence noise the computation is the artifact's own, so the logits are the artifact's logits. What the
server still sees: the vectors it receives (without occurrence noise, identical for identical tokens) and the hidden
states (ISA/IMA). Which engines can run it: transformers (``aloe serve``) yes; llama.cpp's C API takes embeddings in
a batch but ``llama-server`` has no request for them; vLLM takes ``prompt_embeds`` for the prompt only and applies
its own LM head, so it cannot serve this mode.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aloe import AloeError
from aloe.assets.cache import atomic_directory
from aloe.obfuscation.checkpoint import CheckpointReader
from aloe.obfuscation.embedding import NOISE_SHAPES, noise_std

TABLES = ("model.embed_tokens.weight", "lm_head.weight")
CLIENT_FORMAT = "aloe-client-vocabulary-v1"
MANIFEST_FLAG = "client_held_vocabulary"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def _eos_ids(artifact: Path, config: dict) -> list[int]:
    ids: list[int] = []
    sources = [config]
    gen = artifact / "generation_config.json"
    if gen.is_file():
        sources.append(json.loads(gen.read_text()))
    for src in sources:
        v = src.get("eos_token_id")
        ids.extend(v if isinstance(v, list) else [] if v is None else [v])
    return sorted({int(i) for i in ids})


def embedding_gain(config: dict, dtype: torch.dtype) -> float:
    """The factor a stock engine puts on the rows it looks up itself and not on ``inputs_embeds``: sqrt(hidden_size)
    in the weights' dtype for the architectures that scale their embedding (Gemma), else 1."""
    from aloe.obfuscation.architectures import SPECS

    spec = SPECS.get(config.get("model_type"))
    if spec is None or not spec.embed_scale:
        return 1.0
    return float(torch.tensor(float(config["hidden_size"]) ** 0.5).to(dtype))


def split_vocabulary(artifact: Path, server_dir: Path, client_file: Path, *, occurrence_noise: float = 0.0,
                     noise_shape: str = "row") -> dict:
    """Write the server artifact (no vocabulary rows) to ``server_dir`` and the tables to ``client_file``.

    ``occurrence_noise`` (alpha, relative to each row as in :func:`~aloe.obfuscation.embedding.noise_std`) is the
    fresh noise the client adds to every embedding it sends; 0 keeps the artifact's logits exactly. The client's
    embedding rows are what the engine's first layer would receive from its own lookup (:func:`embedding_gain`)."""
    artifact, server_dir, client_file = Path(artifact), Path(server_dir), Path(client_file)
    if not occurrence_noise >= 0:
        raise AloeError(f"occurrence noise must be >= 0, not {occurrence_noise}")
    if noise_shape not in NOISE_SHAPES:
        raise AloeError(f"unknown noise shape {noise_shape!r}; choose one of {', '.join(NOISE_SHAPES)}")
    if server_dir.exists():
        raise AloeError(f"output folder {server_dir} already exists")
    if client_file.exists():
        raise AloeError(f"client vocabulary file {client_file} already exists; choose a new path")
    if client_file.resolve().is_relative_to(server_dir.resolve()):
        raise AloeError("the client vocabulary file must not be inside the server folder (the server would get it)")
    try:
        manifest = json.loads((artifact / "aloe.json").read_text())
        config = json.loads((artifact / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AloeError(f"{artifact} is not an aloe artifact ({exc})") from None
    if manifest.get(MANIFEST_FLAG):
        raise AloeError(f"{artifact} already holds no vocabulary")
    reader = CheckpointReader(artifact)
    missing = [t for t in TABLES if t not in reader]
    if missing:
        raise AloeError(f"{artifact} lacks {', '.join(missing)}")
    tensors = {name: torch.from_numpy(reader.get(name)) for name in reader.where}
    dtype = next(t.dtype for n, t in tensors.items() if n not in TABLES)
    client = {name: tensors[name].float().clone() for name in TABLES}
    gain = embedding_gain(config, dtype)
    if gain != 1.0:   # the engine scales its own lookups (Gemma), never inputs_embeds: the client sends them scaled
        client[TABLES[0]] *= gain
    for name in TABLES:
        tensors[name] = torch.zeros((1, tensors[name].shape[1]), dtype=dtype)
    tensors = {n: t.to(dtype) for n, t in tensors.items()}
    vocab = int(client[TABLES[0]].shape[0])
    server_config = dict(config, vocab_size=1, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    with atomic_directory(server_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in artifact.iterdir():
            if (f.is_file() and not f.name.startswith("model.safetensors") and f.name not in TOKENIZER_FILES
                    and f.name not in ("aloe.json", "config.json", "generation_config.json")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(server_config, indent=2) + "\n")
        manifest.update({MANIFEST_FLAG: True, "vocabulary_rows": 0, "vocab_size": vocab})
        manifest.pop("shards", None)
        (tmp / "aloe.json").write_text(json.dumps(manifest, indent=2) + "\n")
    meta = {"format": CLIENT_FORMAT, "secret_fingerprint": str(manifest.get("secret_fingerprint")),
            "eos_token_ids": json.dumps(_eos_ids(artifact, config)), "occurrence_noise": repr(float(occurrence_noise)),
            "noise_shape": noise_shape, "vocab_size": str(vocab)}
    tmp_client = client_file.with_name(client_file.name + ".tmp")
    save_file(client, str(tmp_client), metadata=meta)
    os.chmod(tmp_client, 0o600)
    tmp_client.replace(client_file)
    return {"server": str(server_dir), "client": str(client_file), "vocab_size": vocab,
            "hidden_size": int(client[TABLES[0]].shape[1]), "occurrence_noise": float(occurrence_noise)}


class OccurrenceNoise:
    """Fresh noise for every occurrence of a row: ``rows + N(0, sigma_i^2)`` with ``sigma_i`` from
    :func:`~aloe.obfuscation.embedding.noise_std` (``alpha`` relative to row ``i`` of ``table``), drawn from a
    generator keyed by the OS CSPRNG (never a fixed seed). ``alpha`` 0 returns the rows unchanged."""

    def __init__(self, table: torch.Tensor, alpha: float, shape: str = "row") -> None:
        if not alpha >= 0:
            raise AloeError(f"occurrence noise must be >= 0, not {alpha}")
        self.alpha = float(alpha)
        self.sigma = torch.from_numpy(noise_std(table.double().numpy(), self.alpha, shape)).float() if alpha else None
        self._gen = torch.Generator().manual_seed(secrets.randbits(63))

    def __call__(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.sigma is None:
            return rows
        noise = torch.randn(rows.shape, generator=self._gen) * self.sigma[ids].unsqueeze(-1)
        return rows + noise.to(rows.dtype)


class NoisyEmbedding(torch.nn.Module):
    """An input embedding that adds fresh occurrence noise at every lookup: the client-held deployment's inputs,
    inside one stock model, so that fidelity can be measured with the ordinary generate and forward calls (each
    new token of a decode is looked up once, as the client sends it once)."""

    def __init__(self, embedding: torch.nn.Embedding, alpha: float, shape: str = "row") -> None:
        super().__init__()
        self.embedding = embedding
        gain = float(getattr(embedding, "scalar_embed_scale", 1.0))   # the rows as looked up (Gemma scales them)
        self.noise = OccurrenceNoise(embedding.weight.detach().float() * gain, alpha, shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.noise(ids, self.embedding(ids))


def with_occurrence_noise(model, alpha: float, shape: str = "row"):
    """``model`` (a stock causal LM holding its obfuscated tables) with fresh per-occurrence noise on its inputs."""
    model.set_input_embeddings(NoisyEmbedding(model.get_input_embeddings(), alpha, shape))
    return model


class ClientVocabulary:
    """The client's half: embedding lookup (plus fresh per-occurrence noise) before a request, the head after it."""

    def __init__(self, client_file: Path, occurrence_noise: float | None = None) -> None:
        """``occurrence_noise`` overrides the level the file was written with (None: the file's)."""
        from safetensors import safe_open

        try:
            with safe_open(str(client_file), "pt") as fh:
                meta = fh.metadata() or {}
            t = load_file(str(client_file))
        except Exception as exc:
            raise AloeError(f"client vocabulary file {client_file} is unreadable: {exc}") from None
        if meta.get("format") != CLIENT_FORMAT or any(name not in t for name in TABLES):
            raise AloeError(f"{client_file} is not a client vocabulary file ({CLIENT_FORMAT})")
        self.embed_table, self.head = t[TABLES[0]].float(), t[TABLES[1]].float()
        self.fingerprint = meta.get("secret_fingerprint")
        self.eos_ids = [int(i) for i in json.loads(meta.get("eos_token_ids", "[]"))]
        self.occurrence_noise = float(meta.get("occurrence_noise", "0") if occurrence_noise is None
                                      else occurrence_noise)
        self.hidden_size = int(self.embed_table.shape[1])
        self.vocab_size = int(self.embed_table.shape[0])
        self.noise_shape = meta.get("noise_shape", "row")
        self._noise = OccurrenceNoise(self.embed_table, self.occurrence_noise, self.noise_shape)

    def embed(self, obf_ids) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(obf_ids, dtype=np.int64))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise AloeError(f"token id outside the vocabulary 0..{self.vocab_size - 1}")
        return self._noise(ids, self.embed_table[ids])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Obfuscated-order logits from final hidden states."""
        return hidden.float() @ self.head.T


def encode_array(a: torch.Tensor) -> str:
    """A float32 array as base64 (little-endian), the wire format of the embeddings API."""
    import base64

    return base64.b64encode(np.ascontiguousarray(a.detach().float().numpy(), dtype="<f4").tobytes()).decode()


def decode_array(text: str, width: int) -> np.ndarray:
    import base64
    import binascii

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise AloeError("embeds: not valid base64") from None
    if len(raw) % (4 * width):
        raise AloeError(f"embeds: {len(raw)} bytes is not a whole number of rows of {width} float32")
    arr = np.frombuffer(raw, dtype="<f4").reshape(-1, width)
    if not np.isfinite(arr).all():
        raise AloeError("embeds: values must be finite")
    return arr


@torch.no_grad()
def local_decode(body, client: ClientVocabulary, obf_prompt, max_new_tokens: int, sent: list | None = None,
                 sampler=None) -> tuple[list[int], torch.Tensor]:
    """The client-held decode loop with the server's body in this process (``body``: the stock causal LM loaded from
    the server folder): the client's noisy vectors in, the last final hidden state out, the client's head and its
    pick, until an end-of-sequence id or ``max_new_tokens``. The pick is greedy, or ``sampler(context_ids, logits)``
    (the client's own :class:`aloe.obfuscation.client.Sampler`: temperature, top-k, top-p, repetition penalty on
    obfuscated-order logits). Returns the obfuscated ids picked (the end id not included) and the hidden state each
    pick was made from (n x d'), exactly what the server returned. With ``sent`` a list, the vectors of every request
    are appended to it as the server received them (the prompt's, then one per pick sent back)."""
    context = [int(i) for i in obf_prompt]
    ids, cache, picked, states = list(context), None, [], []
    eos = set(client.eos_ids)
    for _ in range(max_new_tokens):
        vectors = client.embed(ids)[None].to(body.dtype)
        if sent is not None:
            sent.append(vectors[0])
        out = body.model(inputs_embeds=vectors, cache=cache, use_cache=True)
        cache, h = out.cache, out.last_hidden_state[0, -1].float()
        logits = client.logits(h[None])[0]
        nxt = int(logits.argmax()) if sampler is None else int(sampler(context, logits))
        if nxt in eos:
            break
        picked.append(nxt)
        states.append(h)
        context.append(nxt)
        ids = [nxt]
    return picked, torch.stack(states) if states else torch.empty(0, client.hidden_size)
