"""dtype auto|float32|float16|bfloat16: the engine runs in each, and its logits track fp32."""
import pytest
import torch

from lmwrap_engine.config import EngineConfig
from lmwrap_engine.engine.model_runner import ModelRunner, resolve_dtype
from lmwrap_engine.models.config import ModelArgs
from test_engine_parity import run_prefill_logits


@pytest.mark.parametrize("dtype,atol", [("float16", 0.05), ("bfloat16", 0.2)])
def test_half_precision_logits_track_float32(tiny_model_dir, dtype, atol):
    path = tiny_model_dir("qwen2")
    ids = list(range(3, 40))
    runners = {d: ModelRunner(path, EngineConfig(dtype=d, num_gpu_blocks=8, block_size=16, device_type="cpu"))
               for d in ("float32", dtype)}
    assert runners[dtype].dtype == getattr(torch, dtype)
    assert runners[dtype].k_cache.dtype == getattr(torch, dtype)
    full = run_prefill_logits(runners["float32"], ids, [len(ids)])
    half = run_prefill_logits(runners[dtype], ids, [30, 1, 1, 1, 1, 1, 1, 1])
    torch.testing.assert_close(half, full, atol=atol, rtol=0)


def test_auto_dtype_on_cpu_follows_the_config_and_the_hardware(monkeypatch):
    import lmwrap_engine.engine.model_runner as mr
    args = ModelArgs.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8,
                                         intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                         torch_dtype="bfloat16"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(mr, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", args, cpu) == torch.bfloat16
    monkeypatch.setattr(mr, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", args, cpu) == torch.float32
    args.dtype = "float16"
    assert resolve_dtype("auto", args, cpu) == torch.float32
    args.dtype = "float32"
    assert resolve_dtype("auto", args, cpu) == torch.float32
    monkeypatch.setattr(mr, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", args, cpu) == torch.float32  # a float32 config stays (converted GGUFs)
    assert resolve_dtype("float16", args, cpu) == torch.float16  # an explicit choice is honoured
