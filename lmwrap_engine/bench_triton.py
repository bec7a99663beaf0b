"""``lmwrap bench serving --protocol triton``: the serving benchmark's workload through gRPC, against the
text model (Triton's LLM convention) of ``lmwrap serve triton`` or any Triton LLM server.

Each request is one decoupled ``ModelStreamInfer`` call with ``stream=True``, ``ignore_eos``, greedy,
``max_tokens`` = its output length; every response is a token event (the server answers once per
engine step, as vLLM's Triton backend), timestamped on arrival.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from .bench_serving import RequestResult, TokenClock, _free_port, _run_rates
from .serve.triton import protocol as P


def send_request_inputs(grpcclient, prompt: str, output_len: int):
    import numpy as np
    sampling = json.dumps(dict(max_tokens=output_len, temperature=0, ignore_eos=True)).encode()
    values = dict(text_input=np.array([prompt.encode()], dtype=object), stream=np.array([True]),
                  sampling_parameters=np.array([sampling], dtype=object), exclude_input_in_output=np.array([True]))
    inputs = []
    for name, array in values.items():
        item = grpcclient.InferInput(name, list(array.shape), P.TEXT_INPUTS[name].datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


async def send_triton(client, model: str, prompt: str, output_len: int, timeout: float) -> RequestResult:
    """One streamed request on the aio gRPC client; a token event is every response with outputs."""
    import tritonclient.grpc.aio as grpcclient
    result = RequestResult()
    clock = TokenClock()

    async def requests():
        yield dict(model_name=model, inputs=send_request_inputs(grpcclient, prompt, output_len),
                   enable_empty_final_response=True)

    try:
        async for response, error in client.stream_infer(requests(), stream_timeout=timeout):
            now = time.perf_counter()
            if error is not None:
                raise RuntimeError(str(error))
            if response.get_response().outputs:
                clock.tick(now)
            final = response.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        clock.into(result)
        if clock.events == 0:
            result.error = "the stream carried no tokens"
        else:
            result.output_tokens = clock.events
            result.success = True
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def bench_triton(args, address: str, prompts, rates: List[float]) -> List[dict]:
    import tritonclient.grpc.aio as grpcclient
    model = args.served_model_name or P.TEXT_MODEL
    print(f"server: grpc://{address} (model {model!r}, ModelStreamInfer)", flush=True)
    async with grpcclient.InferenceServerClient(address) as client:
        async def send(prompt: str, output_len: int) -> RequestResult:
            return await send_triton(client, model, prompt, output_len, args.request_timeout)
        return await _run_rates("server", send, args, prompts, rates)


class TritonServer:
    """``lmwrap serve triton`` in a child process on free ports; waits until it serves, stops it on exit."""

    def __init__(self, model: Optional[str], extra_args: Sequence[str] = (), timeout: float = 600.0):
        self.grpc_port, self.http_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.cmd = [sys.executable, "-m", "lmwrap_engine.cli", "serve", "triton", *([model] if model else []),
                    "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port), *extra_args]
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "TritonServer":
        self.log = tempfile.NamedTemporaryFile("w+", prefix="lmwrap-bench-triton-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while "lmwrap serve triton: serving" not in self._log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"lmwrap serve triton did not start: {' '.join(self.cmd)}\n{self._log()[-4000:]}")
            time.sleep(0.25)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def triton_server_args(args) -> List[str]:
    """The engine flags ``lmwrap serve triton`` takes (it has no --dtype / --max-batch-size)."""
    for flag, value in (("--dtype", args.dtype), ("--max-batch-size", args.max_batch_size)):
        if value is not None:
            print(f"note: {flag} is not an option of lmwrap serve triton; ignored", file=sys.stderr)
    return ["--session-len", str(args.session_len)] if args.session_len else []

