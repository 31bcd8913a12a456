"""The client's secret file, kept apart from the artifact.

It holds the master seed (every key, permutation and noise draw is derived from it, so the client can re-derive the
artifact) and tau, the vocabulary permutation that is all the client needs online. It is written atomically with
file mode 0600. The artifact records only the secret's *fingerprint* (a SHA-256 over the secret), so a wrong secret
is detected before use and the fingerprint reveals nothing about the keys.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aloe import AloeError
from aloe.assets.cache import atomic_write_text
from aloe.obfuscation.rng import SEED_BYTES

FORMAT = "aloe-secret-v1"


@dataclass
class Secret:
    seed: bytes
    tau: np.ndarray  # tau[plain_id] = obfuscated_id

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(FORMAT.encode())
        h.update(self.seed)
        h.update(np.ascontiguousarray(self.tau, dtype="<i8").tobytes())
        return h.hexdigest()

    @property
    def tau_inverse(self) -> np.ndarray:
        inv = np.empty_like(self.tau)
        inv[self.tau] = np.arange(len(self.tau), dtype=self.tau.dtype)
        return inv


def save_secret(path: Path, secret: Secret) -> None:
    tau = np.ascontiguousarray(secret.tau, dtype="<i4")
    body = {
        "format": FORMAT,
        "seed": secret.seed.hex(),
        "vocab_size": int(len(tau)),
        "tau": base64.b64encode(tau.tobytes()).decode(),
        "fingerprint": secret.fingerprint,
    }
    atomic_write_text(Path(path), json.dumps(body) + "\n", mode=0o600)


def load_secret(path: Path) -> Secret:
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise AloeError(f"secret file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise AloeError(f"secret file {path} is unreadable or not JSON: {exc}") from None
    try:
        if body.get("format") != FORMAT:
            raise ValueError(f"format is {body.get('format')!r}, expected {FORMAT!r}")
        seed = bytes.fromhex(body["seed"])
        if len(seed) != SEED_BYTES:
            raise ValueError("seed has the wrong length")
        tau = np.frombuffer(base64.b64decode(body["tau"]), dtype="<i4").astype(np.int64)
        if len(tau) != int(body["vocab_size"]) or not np.array_equal(np.sort(tau), np.arange(len(tau))):
            raise ValueError("tau is not a permutation of the vocabulary")
        secret = Secret(seed, tau)
        if body.get("fingerprint") != secret.fingerprint:
            raise ValueError("fingerprint does not match its contents")
    except (KeyError, ValueError, TypeError) as exc:
        raise AloeError(f"secret file {path} is corrupt: {exc}") from None
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise AloeError(f"secret file {path} is readable by others (mode {mode:o}); run chmod 600 on it")
    return secret


def check_artifact_secret(artifact: Path, secret: Secret) -> dict:
    """Read ``aloe.json`` of an obfuscated folder and check that it was made with this secret."""
    manifest_path = Path(artifact) / "aloe.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise AloeError(f"{artifact} is not an aloe artifact (no aloe.json)") from None
    except (OSError, ValueError) as exc:
        raise AloeError(f"{manifest_path} is unreadable: {exc}") from None
    if manifest.get("secret_fingerprint") != secret.fingerprint:
        raise AloeError(f"the secret does not belong to {artifact} (fingerprint mismatch)")
    return manifest
