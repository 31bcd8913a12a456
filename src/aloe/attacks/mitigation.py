"""Mitigation against behavioural matching (and every weight attack that needs the vocabulary tables): a
*client-held vocabulary* deployment of an existing artifact.

Behavioural matching works because the server can run the model it hosts on any token id it likes and read the
output distribution over ids. Both need the two vocabulary tables, the obfuscated embedding and LM head. Here the
client keeps them, next to tau:

- the server artifact is the same stock checkpoint with ``embed_tokens`` and ``lm_head`` zeroed (shapes kept, so any
  engine still loads it); it is driven with ``inputs_embeds`` and returns the final hidden states (d' floats per
  position, the last position only when decoding);
- the client looks up its rows (``embed``), sends them, and applies its head to what comes back (``logits``):
  n x d' multiply-adds per generated token (40 M for SmolLM2, a few milliseconds on a CPU).

The obfuscated computation is unchanged, so the logits are exactly those of the artifact. The server can no longer
produce a single output distribution nor enumerate the vocabulary, and every VMA/IA/NN pair involves a table it
does not hold. What it still sees, and what this does *not* hide: the embedding vectors it receives (identical for
identical tokens, so token-frequency matching on the stream is unchanged) and the hidden states (ISA/IMA). This
module only re-packages an artifact; it does not change the transform.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aloe import AloeError
from aloe.assets.cache import atomic_directory
from aloe.obfuscation.checkpoint import CheckpointReader

TABLES = ("model.embed_tokens.weight", "lm_head.weight")
CLIENT_FORMAT = "aloe-client-vocabulary-v1"


def split_vocabulary(artifact: Path, server_dir: Path, client_file: Path) -> dict:
    """Write the server artifact (tables zeroed) to ``server_dir`` and the tables to ``client_file`` (mode 0600)."""
    artifact, server_dir, client_file = Path(artifact), Path(server_dir), Path(client_file)
    if server_dir.exists():
        raise AloeError(f"output folder {server_dir} already exists")
    if client_file.resolve().is_relative_to(server_dir.resolve()):
        raise AloeError("the client file must not be inside the server folder")
    reader = CheckpointReader(artifact)
    missing = [t for t in TABLES if t not in reader]
    if missing:
        raise AloeError(f"{artifact} lacks {', '.join(missing)}")
    tensors = {name: torch.from_numpy(reader.get(name)).float() for name in reader.where}
    client = {name: tensors[name].clone() for name in TABLES}
    for name in TABLES:
        tensors[name] = torch.zeros_like(tensors[name])
    with atomic_directory(server_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in artifact.iterdir():
            if f.is_file() and not f.name.startswith("model.safetensors") and f.name != "aloe.json":
                (tmp / f.name).write_bytes(f.read_bytes())
        manifest = json.loads((artifact / "aloe.json").read_text())
        manifest["client_held_vocabulary"] = True
        manifest.pop("shards", None)
        (tmp / "aloe.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tmp_client = client_file.with_name(client_file.name + ".tmp")
    save_file(client, str(tmp_client), metadata={"format": CLIENT_FORMAT})
    os.chmod(tmp_client, 0o600)
    tmp_client.replace(client_file)
    return {"server": str(server_dir), "client": str(client_file)}


def received_rows_view(target, artifact: Path, sent_obf_ids):
    """The server's view of a client-held-vocabulary deployment after it has served a stream: ``target`` (built on
    the server folder, tables zeroed) gets back exactly the embedding rows the client sent (the obfuscated ids in
    ``sent_obf_ids``; identical tokens give identical vectors, so the server can index them). The LM head stays
    unseen. Attacks that use the embedding table (VMA, IA, NN) then measure what those received vectors leak."""
    reader = CheckpointReader(Path(artifact))
    full = torch.from_numpy(reader.get(TABLES[0])).float()
    ids = torch.as_tensor(sorted({int(i) for i in sent_obf_ids}), dtype=torch.long)
    rows = torch.zeros_like(full)
    rows[ids] = full[ids]
    target.__dict__["obf_embed"] = rows  # replaces the zeroed table (a cached property of Target)
    return target


class ClientVocabulary:
    """The client's half: embedding lookup before the request, LM head after it."""

    def __init__(self, client_file: Path):
        try:
            t = load_file(str(client_file))
        except Exception as exc:
            raise AloeError(f"client vocabulary file {client_file} is unreadable: {exc}") from None
        self.embed_table, self.head = t[TABLES[0]], t[TABLES[1]]

    def embed(self, obf_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_table[obf_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head.T
