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


def test_auto_dtype_on_cpu_follows_the_hardware_whatever_the_config(monkeypatch):
    import lmwrap_engine.engine.model_runner as mr
    args = ModelArgs.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8,
                                         intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                                         torch_dtype="bfloat16"))
    cpu = torch.device("cpu")
    for config_dtype in ("bfloat16", "float16", "float32"):  # float32: a converted GGUF, too
        args.dtype = config_dtype
        monkeypatch.setattr(mr, "cpu_has_fast_bf16", lambda: True)
        assert resolve_dtype("auto", args, cpu) == torch.bfloat16
        monkeypatch.setattr(mr, "cpu_has_fast_bf16", lambda: False)
        assert resolve_dtype("auto", args, cpu) == torch.float32
    assert resolve_dtype("float16", args, cpu) == torch.float16  # an explicit choice is honoured
    assert resolve_dtype("float32", args, cpu) == torch.float32


def test_avx2_emulation_turns_fast_bf16_off(monkeypatch):
    from lmwrap_engine.engine import cpu_features
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert cpu_features.cpu_has_fast_bf16()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not cpu_features.cpu_has_fast_bf16()
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert cpu_features.cpu_has_fast_bf16()
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not cpu_features.cpu_has_fast_bf16()


def test_physical_cores_count_smt_siblings_once(tmp_path):
    from lmwrap_engine.engine import cpu_features
    for cpu, (package, core) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 0)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert cpu_features.physical_cores(range(6), sysfs=str(tmp_path)) == 3
    assert cpu_features.physical_cores([0, 2], sysfs=str(tmp_path)) == 1  # two siblings of one core
    assert cpu_features.physical_cores([7, 8], sysfs=str(tmp_path)) == 2  # no topology: each CPU a core
    assert "intra-op threads" in cpu_features.describe_cpu()
