"""Mitigation against behavioural matching (and every weight attack that needs the vocabulary tables): the
*client-held vocabulary* deployment (:mod:`aloe.obfuscation.client_vocab`), seen from the attacker's side.

The server artifact holds neither table, so the server can no longer produce a single output distribution nor
enumerate the vocabulary, and every VMA/IA/NN pair involves a table it does not hold. What it still sees, and what
this does *not* hide: the embedding vectors it receives (identical for identical tokens unless the deployment adds
per-occurrence noise, so token-frequency matching on the stream is unchanged) and the hidden states (ISA/IMA).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aloe.obfuscation.checkpoint import CheckpointReader
from aloe.obfuscation.client_vocab import TABLES, ClientVocabulary, split_vocabulary

__all__ = ["ClientVocabulary", "received_rows_view", "split_vocabulary"]


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
