"""A plain Hugging Face folder built offline from a GGUF file shipped in registry packages.

transformers dequantises a GGUF checkpoint to float32 on load; such a model cannot be ``save_pretrained``
directly, so we rebuild it from its config (without the quantisation entry) and save that: a stock folder
(config.json, model.safetensors, tokenizer files with the chat template, generation_config.json) that
``AutoModelForCausalLM.from_pretrained(path)`` loads with no network and no aloe code.

Each model is described by a :class:`GGUFModelSpec`: where its GGUF lives (one file, or chunks whose
concatenation is the file), the expected sha256 when the packages publish one, and what the GGUF lacks
(a chat template, the end-of-turn token for generation).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from aloe import AloeError, __version__
from aloe.assets.cache import atomic_directory, atomic_write_json, cache_root, ensure_writable_dir

MARKER = "aloe-asset.json"


@dataclass
class BuiltModel:
    path: str
    n_params: int
    seconds: float
    reused: bool
    source: str
    source_sha256: str


@dataclass(frozen=True)
class GGUFModelSpec:
    name: str  # the name on the command line
    asset: str  # the folder under <cache>/models
    source: str  # what the marker records as the source, e.g. "pkg==1.0:file.gguf"
    gguf_name: str  # file name of the (assembled) GGUF
    parts: Callable[[], list[Path]]  # files whose concatenation is the GGUF
    expected_sha256: Callable[[], str] | None = None  # sha256 the packages publish for the GGUF
    chat_template: str | None = None  # used when the GGUF carries none
    generation: dict = field(default_factory=dict)  # generation_config.json entries to set


def package_file(module: str, package: str, version: str, relpath: str) -> Path:
    """A data file inside an installed registry package, located without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AloeError(
            f"package {package} is not installed; install it with "
            f"'pip install --no-deps {package}=={version}' (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise AloeError(f"package {package} is installed but {path} is missing; reinstall the package")
    return path


def sha256_files(paths: Sequence[Path]) -> str:
    """sha256 of the concatenation of ``paths``."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def validate_gguf(path: Path) -> int:
    """Parse the GGUF header and tensor table; a truncated or corrupt file raises :class:`AloeError`.

    Returns the number of tensors.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise AloeError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
        n = len(reader.tensors)
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except AloeError:
        raise
    except Exception as exc:  # gguf raises ValueError, struct errors, mmap errors ...
        raise AloeError(f"GGUF file {path} is corrupt or truncated: {exc}") from None
    if n == 0:
        raise AloeError(f"GGUF file {path} holds no tensors")
    return n


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _assemble(parts: Sequence[Path], target: Path) -> Path:
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    return target


def _load_plain(src: Path, spec: GGUFModelSpec):
    """The tokenizer and the dequantised float32 model of ``src``, rebuilt without its quantisation entry."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise AloeError(f"GGUF file {src} could not be loaded: {exc}") from None
    if spec.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    for key, value in spec.generation.items():
        setattr(plain.generation_config, key, value)
    return tokenizer, plain


def build_gguf_model(spec: GGUFModelSpec, *, gguf: Path | None = None, cache: Path | None = None,
                     force: bool = False, progress: bool = True) -> BuiltModel:
    """Build (or reuse) the plain HF folder of ``spec`` under the cache.

    ``gguf`` reads that file instead of the packages'. A cached build is reused when its marker records the
    same source sha256 (and ``force`` is not set).
    """
    t0 = time.perf_counter()
    parts = [Path(gguf)] if gguf is not None else spec.parts()
    root = ensure_writable_dir(Path(cache) if cache is not None else cache_root())
    final = root / "models" / spec.asset
    steps = tqdm(total=5, desc=f"build {spec.name}", unit="step", disable=not progress)

    steps.set_postfix_str("checking GGUF")
    for part in parts:
        if not part.is_file():
            raise AloeError(f"GGUF file {part} does not exist")
    digest = sha256_files(parts)
    source = str(parts[0]) if len(parts) == 1 else spec.source
    marker = _read_marker(final) if final.exists() else None
    if marker is not None and marker.get("source_sha256") == digest and not force:
        steps.update(steps.total - steps.n)
        steps.close()
        return BuiltModel(str(final), int(marker["n_params"]), time.perf_counter() - t0, True, source, digest)
    published = spec.expected_sha256() if gguf is None and spec.expected_sha256 is not None else None
    if published is not None and digest != published:
        raise AloeError(f"GGUF file {spec.gguf_name} assembled from {spec.source} is corrupt or truncated: "
                        f"sha256 {digest} is not the published {published}; reinstall the packages")
    steps.update(1)

    (root / "models").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "models", prefix=f".{spec.asset}.gguf-") as scratch:
        steps.set_postfix_str("assembling GGUF")
        src = parts[0] if len(parts) == 1 else _assemble(parts, Path(scratch) / spec.gguf_name)
        if published is None:  # a published sha256 that matched already vouches for the file
            validate_gguf(src)
        steps.update(1)
        steps.set_postfix_str("dequantising weights")
        tokenizer, plain = _load_plain(src, spec)
    n_params = sum(p.numel() for p in plain.parameters())
    steps.update(1)

    steps.set_postfix_str("saving")
    with atomic_directory(final, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, {
            "asset": spec.asset,
            "source": spec.source if gguf is None else str(src),
            "source_sha256": digest,
            "n_params": n_params,
            "aloe_version": __version__,
        })
    steps.update(2)
    steps.close()
    return BuiltModel(str(final), n_params, time.perf_counter() - t0, False, source, digest)


def as_dict(built: BuiltModel) -> dict:
    return asdict(built)
