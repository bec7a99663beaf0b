"""The examples as a user runs them: the config-swap agent in every mode it advertises, on the default model."""
import os
import subprocess
import sys

import pytest

from serving import running_server
from triton_serving import running_triton, triton_host_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SWAP = os.path.join(ROOT, "examples", "config_swap.py")


def run_example(*args) -> dict:
    proc = subprocess.run([sys.executable, CONFIG_SWAP, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    tools = next(line for line in lines if line.startswith("tools used:"))
    answer = next(line for line in lines if line.startswith("answer:"))
    stream = lines[lines.index("stream_chat, the same on every adapter:") + 1:]
    assert stream and stream[-1].strip().startswith("END")
    return dict(tools=tools, answer=answer, stream_end=stream[-1])


@pytest.mark.slow
def test_config_swap_runs_every_mode_it_advertises_with_the_same_greedy_result():
    """The same agent and greedy settings give the same tool calls, answer and stream, wherever the model runs."""
    in_process = run_example("LMDeployPipeline")
    child_server = run_example("LMDeployServer")
    with running_server("SmolLM2-135M-Instruct") as (url, _):
        remote = run_example("LMDeployClient", "--url", url)
    with running_triton(triton_host_python(), "--session-len", "4096") as (address, _):
        triton = run_example("TritonClient", "--tritonserver-addr", address)
    assert in_process == child_server == remote == triton
    assert "PythonInterpreter" in in_process["tools"]
