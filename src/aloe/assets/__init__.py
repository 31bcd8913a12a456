"""Offline real assets: models and corpora from registry packages, built once and cached."""

from aloe.assets.cache import cache_root
from aloe.assets.corpus import CORPORA, load_corpus
from aloe.assets.smollm2 import build_smollm2, smollm2_gguf_path

__all__ = ["CORPORA", "build_smollm2", "cache_root", "load_corpus", "smollm2_gguf_path"]
