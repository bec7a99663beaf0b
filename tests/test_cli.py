"""The `lmwrap` command as a user runs it: a real subprocess with a terminal-like stdin."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

LMWRAP = [sys.executable, "-m", "lmwrap_engine.cli"]


def test_list_prints_template_names():
    out = subprocess.run(LMWRAP + ["list"], capture_output=True, text=True, check=True).stdout.split()
    for name in ("internlm2", "qwen", "chatml", "llama3", "llama2", "vicuna", "base"):
        assert name in out


def test_chat_streams_keeps_session_and_exits_on_eof(tiny_model_dir):
    path = tiny_model_dir("llama")
    proc = subprocess.run(LMWRAP + ["chat", path, "--max-new-tokens", "8", "--dtype", "float32"],
                          input="hello world\nThe capital of France\n/reset\nhi\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 5   # three turns, a /reset, then EOF at the fifth prompt
    assert "Traceback" not in proc.stderr


NEVER_ENDS_POSITIONS = 1 << 17  # a reply of that many tokens outlasts the test by minutes


def _model_that_never_ends(src: str, dst: str) -> str:
    """A copy of ``src`` whose EOS logit is pinned at 0, so greedy replies run on whatever the CPU's rounding,
    with room for ``NEVER_ENDS_POSITIONS`` positions (the engine caps a session at the model's)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    config_path = os.path.join(dst, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["max_position_embeddings"] = NEVER_ENDS_POSITIONS
    with open(config_path, "w") as f:
        json.dump(config, f)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    weights["lm_head.weight"][config["eos_token_id"]] = 0.0
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_chat_ctrl_c_stops_a_reply_then_ctrl_c_at_prompt_exits(tiny_model_dir, tmp_path):
    path = _model_that_never_ends(tiny_model_dir("llama"), str(tmp_path / "never-ends"))
    proc = subprocess.Popen(LMWRAP + ["chat", path, "--max-new-tokens", "100000", "--dtype", "float32",
                                      "--session-len", str(NEVER_ENDS_POSITIONS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = []
        threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
        chunks = []
        threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True).start()
        proc.stdin.write("tell me a long story\n")
        proc.stdin.flush()
        deadline = time.time() + 120
        while len(chunks) < 40 and time.time() < deadline:  # the reply is streaming
            time.sleep(0.05)
        assert len(chunks) >= 40, "".join(stderr)
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 60
        while "[stopped]\n" not in "".join(stderr) and time.time() < deadline:
            time.sleep(0.05)
        assert "[stopped]" in "".join(stderr)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # a failed check must not leave a reply running through the rest of the suite
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(stderr)
