"""llama.cpp, the server people deploy: build ``llama-server`` from the source that the ``llama-cpp-python`` sdist
vendors (pinned), cache the binary, export GGUF with llama.cpp's own ``convert_hf_to_gguf.py``, and run it.

llama.cpp's C++ server takes token-id arrays as prompts and returns token ids, so it can serve a permuted
vocabulary unmodified (its Python server cannot: it neither accepts nor returns ids).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from aloe import AloeError
from aloe.assets.cache import atomic_directory, cache_root, ensure_writable_dir

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"


def llamacpp_root() -> Path:
    return cache_root() / "llama.cpp" / SDIST_VERSION


def source_dir() -> Path:
    """The vendored llama.cpp source, fetched as the pinned sdist through pip (a registry package) once."""
    root = ensure_writable_dir(llamacpp_root())
    src = root / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"{SDIST}=={SDIST_VERSION}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise AloeError(f"could not fetch the {SDIST}=={SDIST_VERSION} sdist: {last}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(tmp, filter="data")
        vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
        with atomic_directory(src) as out:
            shutil.copytree(vendored, out, dirs_exist_ok=True)
    return src


def llama_server_binary(*, jobs: int | None = None, progress: bool = True) -> Path:
    """Path of the cached ``llama-server``, building it first (cmake, a few minutes on 2 cores) if needed."""
    root = llamacpp_root()
    final = root / "bin"
    binary = final / "llama-server"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if shutil.which("cmake") is None:
        raise AloeError("cmake is needed to build llama-server (apt-get install cmake)")
    src = source_dir()
    build = root / "build"
    jobs = jobs or os.cpu_count() or 1
    out = None if progress else subprocess.DEVNULL
    steps = [
        ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
         "-DBUILD_SHARED_LIBS=OFF"],
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
    ]
    for cmd in steps:
        if subprocess.run(cmd, stdout=out, stderr=out).returncode != 0:
            raise AloeError(f"building llama-server failed at: {' '.join(cmd[:3])} (see the output above)")
    built = build / "bin" / "llama-server"
    if not built.is_file():
        raise AloeError(f"the llama.cpp build produced no {built}")
    with atomic_directory(final) as tmp:
        shutil.copy2(built, tmp / "llama-server")
    return binary


GGUF_LAYOUT = "2"  # what export_gguf writes beyond the converter's output; cached exports carry it in their name


def token_bytes(text: str, tokenizer_model: str, token_type: int, byte_decoder: dict[str, int]) -> bytes | None:
    """The bytes llama.cpp writes for a token (``gpt2``: byte-level BPE text, mapped back through ``byte_decoder``;
    ``llama``: SentencePiece pieces and ``<0xNN>`` byte tokens), or None for a tokenizer model not handled here."""
    from gguf import TokenType

    if tokenizer_model == "gpt2":
        return bytes(byte_decoder.get(c, 0x3F) for c in text)  # a character outside the byte alphabet: printable
    if tokenizer_model == "llama":
        if token_type == TokenType.BYTE and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:-1], 16)])
        return text.replace("\u2581", " ").encode()
    return None


def mark_partial_utf8_tokens(gguf_file: Path) -> int:
    """For token-id serving of an obfuscated model: mark CONTROL every normal or byte token whose text is not valid
    UTF-8 on its own. The client reads token ids and llama-server's text of an obfuscated id means nothing; but
    llama-server holds back from its stream a token whose text leaves an incomplete UTF-8 sequence, and when a later
    token completes it, sends only the later token's id, so the held one is lost to a streaming client (seen on
    SmolLM2: 313 of 49,152 texts are not valid UTF-8 alone; a tau that sends a generated token onto one of them
    drops it). A CONTROL token's text is empty to llama-server, so nothing is held back; generation, sampling and
    the end-of-generation ids do not read token types. Edits the file in place; returns the number of tokens
    marked (0 for a tokenizer model not handled)."""
    from gguf import GGUFReader, TokenType
    from gguf.vocab import bytes_to_unicode

    byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
    reader = GGUFReader(gguf_file, "r+")
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields or "tokenizer.ggml.token_type" not in fields:
        return 0
    model = bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() if "tokenizer.ggml.model" in fields else ""
    texts, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    marked = 0
    for ti, yi in zip(texts.data, types.data):
        kind = int(types.parts[yi][0])
        if kind not in (TokenType.NORMAL, TokenType.BYTE):
            continue
        raw = token_bytes(bytes(texts.parts[ti]).decode("utf-8"), model, kind, byte_decoder)
        if raw is None:
            return 0
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            types.parts[yi][0] = TokenType.CONTROL
            marked += 1
    reader.data.flush()
    return marked


# architectures that llama.cpp serves only in a form an obfuscated checkpoint does not have (read in its source):
# the answer would be wrong or the load would fail, so the export refuses them
NOT_FOR_OBFUSCATED = {
    "GemmaForCausalLM": "its Gemma model ties the output layer to the token embedding, and the converter drops "
                        "lm_head, while the obfuscated model's head differs from its embedding",
    "Gemma2ForCausalLM": "its Gemma 2 model ties the output layer to the token embedding, and the converter drops "
                         "lm_head, while the obfuscated model's head differs from its embedding",
    "GraniteForCausalLM": "its Granite converter drops head_dim, so llama.cpp would cut the widened hidden size "
                          "into heads of the wrong size",
    "Phi3ForCausalLM": "its Phi-3 converter takes the head size and the RoPE dimensions from hidden_size / "
                       "num_attention_heads, which the widened hidden size makes wrong",
}


def export_gguf(model_dir: Path, out_file: Path, *, outtype: str = "f32") -> Path:
    """Convert a (plain or obfuscated) HF folder to GGUF with llama.cpp's own converter and its own gguf-py. For an
    aloe artifact, the tokens llama-server would hold back from its stream are marked
    (:func:`mark_partial_utf8_tokens`)."""
    if outtype not in ("f32", "f16"):
        raise AloeError("GGUF export supports f32 and f16")
    model_dir, out_file = Path(model_dir), Path(out_file)
    if not (model_dir / "config.json").is_file():
        raise AloeError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        arch = (json.loads((model_dir / "config.json").read_text()).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError) as exc:
        raise AloeError(f"{model_dir / 'config.json'} is unreadable: {exc}") from None
    if (model_dir / "aloe.json").is_file() and arch in NOT_FOR_OBFUSCATED:
        raise AloeError(f"llama.cpp cannot serve an obfuscated {arch}: {NOT_FOR_OBFUSCATED[arch]}; serve it with "
                        "aloe serve (transformers) or vLLM")
    if out_file.exists():
        raise AloeError(f"{out_file} already exists")
    src = source_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
               NO_LOCAL_GGUF="")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_file.parent, prefix=f".{out_file.name}.tmp-", suffix=".gguf")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", tmp,
                               "--outtype", outtype], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise AloeError(f"GGUF export failed: {last}")
        if (model_dir / "aloe.json").is_file():
            mark_partial_utf8_tokens(Path(tmp))
        os.replace(tmp, out_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out_file
