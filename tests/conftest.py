import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU engines decode eagerly in the suite (compiling every test's engine would cost seconds each);
# tests/test_cpu_compiled_decode.py turns the compiled decode step on where it tests it.
os.environ.setdefault("LMWRAP_CPU_COMPILE", "0")

from tiny_models import build_tiny_model, tiny_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def pinned_vector_width():
    """Tests that compile kernels directly (no engine) get the engine's pin too: a suite run under
    ATEN_CPU_CAPABILITY=avx2 must not take AVX-512 code from inductor's cache (kernels/cpu_compiled.py).
    A fixture, not at import: inductor imports triton, and tests/test_kernels.py sets TRITON_INTERPRET
    before triton's first import, at collection (and drops kernels' submodules from ``sys.modules``: an
    import of ``kernels.cpu_compiled`` here would make a second module that the dispatch then uses)."""
    import kernels
    kernels.cpu_compiled.pin_vector_width()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_root):
    """``tiny_model_dir(arch='llama', seed=0, **config_overrides)`` -> folder of a tiny random HF model."""
    def make(arch: str = "llama", seed: int = 0, **overrides) -> str:
        return build_tiny_model(tiny_root, arch, seed, **overrides)
    return make


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The default tiny model's folder."""
    return tiny_model_dir()


@pytest.fixture(scope="module")
def pipe(model_dir):
    """One pipeline per test module on the default tiny model, fp32 with a small fixed cache."""
    from lmwrap_engine import pipeline
    with pipeline(model_dir, tiny_config()) as p:
        yield p
