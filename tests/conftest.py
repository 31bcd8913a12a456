import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct folder, built into the cache on first use."""
    from aloe.assets.smollm2 import build_smollm2

    return build_smollm2(progress=False).path
