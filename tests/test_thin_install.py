"""`pip install lmwrap` without extras is the thin client: requests only, no torch; the HTTP adapters and
lmdeploy's APIClient work, and the engine's names say which extra to install."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r'''
import importlib.util, json, sys
from lmwrap import LMDeployClient, LMDeployServer, build_llm
import lmwrap_engine
from lmwrap_engine.serve.api_client import APIClient
api = lmwrap_engine.client("http://127.0.0.1:9")
try:
    lmwrap_engine.pipeline
except ImportError as exc:
    engine_error = str(exc)
print(json.dumps(dict(torch=importlib.util.find_spec("torch") is not None, api=type(api).__name__,
                      engine_error=engine_error, client=LMDeployClient.__name__)))
'''


@pytest.mark.slow
def test_pip_install_without_extras_is_a_working_thin_client(tmp_path):
    venv = tmp_path / "thin"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", ROOT], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    out = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == dict(torch=False, api="APIClient", client="LMDeployClient",
                          engine_error=result["engine_error"])
    assert "pip install 'lmwrap[engine]'" in result["engine_error"]
    # The command line says what is missing in one line, not a traceback.
    cli = subprocess.run([str(venv / "bin" / "lmwrap"), "serve", "api_server"], capture_output=True, text=True,
                         timeout=120, cwd=str(tmp_path))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert "the engine is not installed" in cli.stderr and "lmwrap[server]" in cli.stderr
