"""Reading a Hugging Face checkpoint tensor by tensor, and writing sharded safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

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
        self.virtual: dict[str, tuple[str, int, int]] = {}   # part -> (fused tensor, first row, end row)
        self.fused_rows: dict[str, int] = {}                  # fused tensor -> the rows of its parts together
        self._fused: tuple[str, torch.Tensor] | None = None   # the last fused tensor read (its parts come in a row)
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
        return name in self.where or name in self.virtual

    def unfuse(self, parts: dict[str, list[tuple[str, int]]]) -> None:
        """Present every fused weight (``{fused: [(part, rows), ...]}``, names without ``.weight``) as its parts, row
        blocks in that order, under the parts' own names (as :meth:`ArchSpec.fused_parts` gives them). A fused
        weight that is missing, or whose rows are not the parts' sum, raises when a part is read."""
        for fused, blocks in parts.items():
            start = 0
            for part, rows in blocks:
                self.virtual[part + ".weight"] = (fused + ".weight", start, start + rows)
                start += rows
            self.fused_rows[fused + ".weight"] = start

    def _part(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        fused, a, b = self.virtual[name]
        if self._fused is None or self._fused[0] != fused:
            self._fused = (fused, self.tensor(fused))
        whole, end = self._fused[1], self.fused_rows[fused]
        if whole.shape[0] != end:
            raise AloeError(f"tensor {fused} has {whole.shape[0]} rows, expected {end} (its parts stacked)")
        t = whole[a:b].clone()
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise AloeError(f"tensor {name} (rows {a}:{b} of {fused}) has shape {tuple(t.shape)}, expected "
                            f"{tuple(shape)}")
        return t

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A tensor in its stored dtype (read alone from its file); missing, corrupt, wrongly shaped or non-finite
        tensors raise :class:`AloeError`."""
        if name in self.virtual and name not in self.where:
            return self._part(name, shape)
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
        if t.is_floating_point() and not _all_finite(t):
            raise AloeError(f"tensor {name} holds non-finite values")
        return t

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A tensor as float64 numpy (see :meth:`tensor`)."""
        return self.tensor(name, shape).to(torch.float64).numpy()

    def fingerprint(self) -> str:
        """SHA-256 over the weight files (identifies the source model in the manifest)."""
        h = hashlib.sha256()
        for path in sorted(set(self.where.values())):
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()


FINITE_CHUNK = 1 << 20


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a float64 sum is non-finite iff some entry is (no float32/16 block can
    overflow it). Summed in blocks of ``FINITE_CHUNK`` entries, because torch casts the whole input to float64
    before a ``sum(dtype=float64)``: over the whole table that temporary is twice a float32 table's size (four
    times a bfloat16 one's) and set the conversion's peak memory."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + FINITE_CHUNK].sum(dtype=torch.float64)))
               for i in range(0, flat.numel(), FINITE_CHUNK))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                       metadata: dict[str, str]) -> tuple[bytes, list[tuple[str, int]]]:
    """The header bytes that :func:`safetensors.torch.save_file` writes for tensors ``(name, dtype, shape, nbytes)``,
    and the order in which their data follows (by dtype, widest first, then by name), with each one's start."""
    order = sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[1] != torch.bfloat16,
                                           e[0]))
    header: dict = {"__metadata__": metadata}
    layout, offset = [], 0
    for name, dtype, shape, nbytes in order:
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout.append((name, offset))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


class ShardWriter:
    """Writes tensors into safetensors shards of bounded size in a folder (plus the index if > 1), streaming.

    Each tensor goes to disk as it is added (cast to the output dtype, then freed): its bytes are appended to a
    scratch file of the open shard, and when the shard is full the final file is assembled from the header and those
    bytes in safetensors' order with in-kernel copies. Memory stays at one tensor (or one chunk of rows for
    :meth:`add_rows`) whatever the shard size; the files are byte for byte what ``save_file`` writes.
    """

    def __init__(self, folder: Path, dtype: str, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.dtype = DTYPES[dtype]
        self.max = max_shard_bytes
        self.pending: list[tuple[str, tuple[int, ...], int, int]] = []   # name, shape, scratch offset, nbytes
        self.pending_bytes = 0
        self.scratch = None
        self.shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def _cast(self, array) -> torch.Tensor:
        t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
        return t.to(self.dtype).contiguous()

    def _begin(self, name: str, shape: tuple[int, ...], nbytes: int) -> None:
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        if self.scratch is None:
            self.scratch = open(self.folder / f"shard-{len(self.shards):05d}.data", "wb")
        self.pending.append((name, tuple(shape), self.pending_bytes, nbytes))
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _write(self, t: torch.Tensor) -> None:
        if t.numel():
            self.scratch.write(t.reshape(-1).view(torch.uint8).numpy().data)

    def add(self, name: str, array) -> None:
        t = self._cast(array)
        self._begin(name, tuple(t.shape), t.numel() * t.element_size())
        self._write(t)

    def add_rows(self, name: str, shape: tuple[int, ...], chunks) -> None:
        """Add a tensor of ``shape`` given as consecutive blocks of rows (an iterable), without ever holding it."""
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=self.dtype).element_size()
        self._begin(name, shape, nbytes)
        written = 0
        for chunk in chunks:
            t = self._cast(chunk)
            written += t.numel() * t.element_size()
            self._write(t)
        if written != nbytes:
            raise ValueError(f"tensor {name}: {written} bytes given for shape {tuple(shape)}")

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.tmp"
        scratch_path = Path(self.scratch.name) if self.scratch is not None else None
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        where = {n: (off, nb) for n, _, off, nb in self.pending}
        header, layout = safetensors_header([(n, self.dtype, shape, nb) for n, shape, _, nb in self.pending],
                                            {"format": "pt"})
        with open(self.folder / name, "wb") as out:
            out.write(header)
            out.flush()
            if scratch_path is not None:
                with open(scratch_path, "rb") as src:
                    for n, _ in layout:
                        _copy_range(src, out, *where[n])
        if scratch_path is not None:
            scratch_path.unlink()
        self.shards.append((name, [n for n, *_ in self.pending]))
        self.pending, self.pending_bytes = [], 0

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


def _copy_range(src, dst, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst`` (in the kernel where it can)."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), nbytes - done, offset + done)
        except (AttributeError, OSError):
            src.seek(offset + done)
            n = dst.write(src.read(min(nbytes - done, 1 << 24)))
            dst.flush()
        if n <= 0:
            raise OSError("short copy while assembling a shard")
        done += n
