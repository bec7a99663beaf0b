import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    """``tiny_model_dir(arch='llama', seed=0, **config_overrides)`` -> folder of a tiny random HF model."""
    def make(arch: str = "llama", seed: int = 0, **overrides) -> str:
        return build_tiny_model(tiny_root, arch, seed, **overrides)
    return make
