"""``lmwrap bench throughput --images N`` runs both sides on a tiny LLaVA and reports them (speed not asserted)."""
import os
import re
import subprocess
import sys

from tiny_vl_models import build_tiny_llava


def test_bench_throughput_with_images(tiny_root, model_dir):
    path = build_tiny_llava(tiny_root)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmwrap_engine.cli", "bench", "throughput", path, "--images", "2",
                           "--dtype", "float32", "--num-requests", "4", "--output-len", "3", "6",
                           "--image-size", "32", "96", "--hf-batch-size", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"workload: 4 requests, 2 random images each \(32-96 px sides\), outputs 3-6 tokens", out), out
    assert re.search(r"lmwrap +: +[\d.]+ s +[\d.]+ output tok/s", out), out
    assert re.search(r"transformers +: +[\d.]+ s +[\d.]+ output tok/s .*padded batches of 2", out), out
    assert re.search(r"ratio +: [\d.]+x", out), out
    # a text-only model is refused with a clear message
    proc = subprocess.run([sys.executable, "-m", "lmwrap_engine.cli", "bench", "throughput", model_dir, "--images",
                           "1", "--num-requests", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "text-only model" in proc.stderr
