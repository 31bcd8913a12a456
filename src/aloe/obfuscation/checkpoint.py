"""Reading a Hugging Face checkpoint tensor by tensor, and writing sharded safetensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aloe import AloeError
from aloe.obfuscation.architectures import SUPPORTED_ARCHITECTURES

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AloeError(f"{model_dir} is not a Hugging Face model folder (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise AloeError(f"{path} is unreadable: {exc}") from None
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES or SUPPORTED_ARCHITECTURES[model_type] not in archs:
        supported = ", ".join(SUPPORTED_ARCHITECTURES.values())
        raise AloeError(f"unsupported architecture {archs or model_type!r}; aloe obfuscates {supported}")
    return config


class CheckpointReader:
    """Lazy access to the tensors of ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        single = self.dir / "model.safetensors"
        index = self.dir / "model.safetensors.index.json"
        if single.is_file():
            self.files = {None: single}
            self.where: dict[str, Path] = {}
            self._open(single)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise AloeError(f"{index} is malformed: {exc}") from None
            self.where = {}
            for shard in sorted(set(weight_map.values())):
                self._open(self.dir / shard)
        else:
            raise AloeError(f"{model_dir} holds no safetensors weights ({' or '.join(WEIGHT_FILES)})")

    def _open(self, path: Path) -> None:
        if not path.is_file():
            raise AloeError(f"weight shard {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self.where[name] = path
        except Exception as exc:
            raise AloeError(f"weight file {path} is corrupt: {exc}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A tensor as float64 numpy; missing, corrupt or wrongly shaped tensors raise :class:`AloeError`."""
        path = self.where.get(name)
        if path is None:
            raise AloeError(f"tensor {name} is missing from {self.dir}")
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as exc:
            raise AloeError(f"tensor {name} in {path} is corrupt: {exc}") from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise AloeError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        arr = t.to(torch.float64).numpy()
        if not np.isfinite(arr).all():
            raise AloeError(f"tensor {name} holds non-finite values")
        return arr

    def fingerprint(self) -> str:
        """SHA-256 over the weight files (identifies the source model in the manifest)."""
        h = hashlib.sha256()
        for path in sorted(set(self.where.values())):
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class ShardWriter:
    """Collects tensors and writes safetensors shards of bounded size into a folder (plus the index if > 1)."""

    def __init__(self, folder: Path, dtype: str, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.tmp"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for k, (tmp, tensors) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
