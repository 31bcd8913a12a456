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


@pytest.fixture(scope="session")
def smollm2_exact(smollm2_path, tmp_path_factory):
    """SmolLM2 obfuscated with the ``exact`` profile (fp32), and its secret."""
    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import PROFILES

    tmp = tmp_path_factory.mktemp("smollm2-exact")
    obfuscate_checkpoint(smollm2_path, tmp / "obf", tmp / "secret.json", PROFILES["exact"], progress=False)
    return tmp / "obf", tmp / "secret.json"


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma 3 270M folder (pretrained), built into the cache on first use."""
    from aloe.assets.gemma3 import gemma3_path as path

    return path()


@pytest.fixture(scope="session")
def gemma3_exact(gemma3_path, tmp_path_factory):
    """Gemma 3 270M obfuscated with the ``exact`` profile (fp32), and its secret; built once (1.5-4 min, ~10 GB
    peak) and removed at the end of the session (2.4 GB)."""
    import shutil

    from aloe.obfuscation.model import obfuscate_checkpoint
    from aloe.obfuscation.profiles import PROFILES

    tmp = tmp_path_factory.mktemp("gemma3-exact")
    obfuscate_checkpoint(gemma3_path, tmp / "obf", tmp / "secret.json", PROFILES["exact"], progress=False)
    yield tmp / "obf", tmp / "secret.json"
    shutil.rmtree(tmp, ignore_errors=True)
