"""LMDeployServer and LMDeployClient against a real ``lmwrap serve api_server`` on a tiny model: the same
greedy text as LMDeployPipeline, kept sessions, errors, the child process's life, and a lagent agent."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lmwrap import (AsyncLMDeployClient, LLMError, LMDeployClient, LMDeployPipeline, LMDeployServer, ModelStatusCode,
                    build_llm)
from meta_templates import CHATML_META

GREEDY = dict(max_new_tokens=12, top_k=1, temperature=0)
PROMPTS = ['The capital of France is', 'hello world, this', 'Name three rivers:', 'def add(a, b):']
DIALOG = [dict(role='system', content='You are terse.'), dict(role='user', content='Name a river.')]
# The server's engine: fp32 like the pipeline's, a small fixed cache.
ENGINE = dict(dtype='float32', session_len=1024, num_gpu_blocks=64, cache_block_seq_len=16)
SESSION_TURNS = ['The capital of France is', ' Paris. The capital of Italy is']


@pytest.fixture(scope='module')
def model_path(tiny_model_dir):
    return tiny_model_dir('llama')


@pytest.fixture(scope='module')
def reference(model_path):
    """What LMDeployPipeline answers (computed first, then its engine is closed to spare the CPU)."""
    with LMDeployPipeline(model_path, meta_template=CHATML_META, pipeline_cfg=ENGINE, **GREEDY) as llm:
        ref = dict(
            prompts=[llm.generate(p) for p in PROMPTS],
            long=llm.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True),
            chat=llm.chat(DIALOG),
            stream_chat=list(llm.stream_chat(DIALOG, max_new_tokens=16, ignore_eos=True)),
        )
        first = llm.generate(SESSION_TURNS[0], session_id=5, sequence_end=False)
        second = llm.generate(SESSION_TURNS[1], session_id=5, sequence_start=False)
        ref['session'] = [first, second]
    assert len(set(ref['prompts'])) > 1  # different prompts really give different answers
    return ref


@pytest.fixture(scope='module')
def server(model_path, reference):
    with LMDeployServer(path=model_path, meta_template='auto', serve_cfg=ENGINE, **GREEDY) as server:
        yield server
    assert not server.is_running


@pytest.fixture(scope='module')
def client(server):
    llm = build_llm(dict(type='LMDeployClient', url=server.url, model_name=server.model_name,
                         meta_template=CHATML_META, **GREEDY))
    assert type(llm) is LMDeployClient
    yield llm
    llm.close()


def test_server_gives_the_pipelines_greedy_text(server, reference):
    assert server.template_parser.meta_template == CHATML_META  # 'auto' read the model's chat template
    assert [server.generate(p) for p in PROMPTS] == reference['prompts']
    assert server.generate(PROMPTS) == reference['prompts']  # a batch: one request with a list of prompts
    assert server.chat(DIALOG) == reference['chat']
    assert server.chat([DIALOG, DIALOG]) == [reference['chat']] * 2


def test_client_gives_the_pipelines_greedy_text(client, reference):
    assert client.generate(PROMPTS) == reference['prompts']
    assert client.chat(DIALOG) == reference['chat']
    assert list(client.stream_chat(DIALOG, max_new_tokens=16, ignore_eos=True)) == reference['stream_chat']


def test_stream_chat_is_cumulative_then_end(client, reference):
    items = list(client.stream_chat(DIALOG, max_new_tokens=16, ignore_eos=True))
    statuses = [status for status, _, _ in items]
    texts = [text for _, text, _ in items]
    assert statuses[-1] is ModelStatusCode.END and set(statuses[:-1]) == {ModelStatusCode.STREAM_ING}
    assert len(items) > 2 and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == reference['stream_chat'][-1][1]


def test_stop_words_cut_the_answer(client, reference):
    full = reference['long']
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    assert client.generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True, stop_words=[stop]) == expected
    *_, (status, text, _) = client.stream_generate(PROMPTS[2], max_new_tokens=32, ignore_eos=True, stop_words=stop)
    assert status == ModelStatusCode.END and text == expected


def test_kept_sessions_continue_on_the_server(client, server, reference):
    first = client.generate(SESSION_TURNS[0], session_id=11, sequence_end=False)
    second = client.generate(SESSION_TURNS[1], session_id=11, sequence_start=False)
    assert [first, second] == reference['session']
    # The same through the server adapter, streaming, then the session is ended explicitly.
    *_, (status, text, _) = server.stream_generate(SESSION_TURNS[0], session_id=12, sequence_end=False)
    assert status == ModelStatusCode.END and text == reference['session'][0]
    *_, (status, text, _) = server.stream_generate(SESSION_TURNS[1], session_id=12, sequence_start=False,
                                                   sequence_end=False)
    assert status == ModelStatusCode.END and text == reference['session'][1]
    server.end_session(12)
    # Without the kept history the continuation is different: it really used the session's KV.
    assert client.generate(SESSION_TURNS[1]) != reference['session'][1]


def test_continuing_a_session_the_server_does_not_hold_is_an_error(client):
    with pytest.raises(LLMError, match='987'):
        client.generate('hello', session_id=987, sequence_start=False)
    *_, (status, _, _) = client.stream_generate('hello', session_id=988, sequence_start=False)
    assert status < 0


def test_unknown_model_is_a_clear_error(server):
    llm = LMDeployClient(server.url, model_name='no-such-model', meta_template=CHATML_META, **GREEDY)
    with pytest.raises(LLMError, match=r"no-such-model.*serves \[") as error:
        llm.generate('hello')
    assert server.model_name in str(error.value)
    items = list(llm.stream_chat(DIALOG))
    assert items == [(ModelStatusCode.SESSION_INVALID_ARG, '', None)]


def test_bad_gen_params_are_errors_not_crashes(client):
    with pytest.raises(LLMError, match='top_p') as error:
        client.generate('hello', top_p=7.0)
    assert error.value.status == ModelStatusCode.SESSION_INVALID_ARG
    assert list(client.stream_chat(DIALOG, top_p=7.0)) == [(ModelStatusCode.SESSION_INVALID_ARG, '', None)]
    with pytest.raises(TypeError, match='no_such_param'):
        client.generate('hello', no_such_param=1)
    assert client.generate(PROMPTS[0])  # the server is fine afterwards


def test_async_client_matches_the_sync_one(server, reference):
    llm = AsyncLMDeployClient(server.url, meta_template=CHATML_META, **GREEDY)  # model_name: the one served

    async def run():
        text = await llm.generate(PROMPTS[0])
        items = [item async for item in llm.stream_chat(DIALOG, max_new_tokens=16, ignore_eos=True)]
        return text, items

    text, items = asyncio.run(run())
    assert text == reference['prompts'][0]
    assert items == reference['stream_chat']


def test_client_waits_for_a_starting_server_and_sends_the_api_key(model_path, reference, tmp_path):
    port = _free_port()
    llm = LMDeployClient(f'http://127.0.0.1:{port}', meta_template=CHATML_META, api_key='sesame',
                         startup_timeout=120, **GREEDY)
    # Nothing listens on the port yet: the server starts while the client is already retrying.
    command = [sys.executable, '-m', 'lmwrap_engine.cli', 'serve', 'api_server', model_path, '--server-name',
               '127.0.0.1', '--server-port', str(port), '--api-keys', 'sesame', *_cli_flags(ENGINE)]
    log = open(tmp_path / 'server.log', 'w+')
    box = []
    timer = threading.Timer(1.0, lambda: box.append(subprocess.Popen(command, stdout=log, stderr=log)))
    timer.start()
    try:
        assert llm.generate(PROMPTS[0]) == reference['prompts'][0], _read(log)
        wrong = LMDeployClient(llm.url, model_name=llm.model_name, api_key='wrong', **GREEDY)
        with pytest.raises(LLMError, match='401'):
            wrong.generate('hello')
    except LLMError as error:
        raise AssertionError(f'{error}\n--- server output ---\n{_read(log)}') from error
    finally:
        timer.join()
        for process in box:
            process.terminate()
            process.wait(30)
        log.close()


def test_a_server_that_never_starts_is_a_clear_error():
    llm = LMDeployClient(f'http://127.0.0.1:{_free_port()}', model_name='x', startup_timeout=1)
    with pytest.raises(LLMError, match='cannot reach the api_server'):
        llm.generate('hello')


CLIENT_WITHOUT_TORCH = '''
import sys
sys.modules['torch'] = None  # any import of torch now fails
from lmwrap import LMDeployClient, build_llm
from meta_templates import CHATML_META
llm = build_llm(dict(type='LMDeployClient', url=sys.argv[1], model_name=sys.argv[2], meta_template=CHATML_META,
                     max_new_tokens=12, top_k=1, temperature=0))
print(json.dumps([llm.generate(sys.argv[3]), 'torch' in sys.modules and sys.modules['torch'] is not None,
                  sorted(m for m in sys.modules if m.startswith('lmwrap_engine'))]))
'''


def test_client_imports_and_works_without_torch(server, reference):
    script = 'import json\n' + CLIENT_WITHOUT_TORCH
    out = subprocess.run([sys.executable, '-c', script, server.url, server.model_name, PROMPTS[1]],
                         capture_output=True, text=True, timeout=120, cwd=_repo_root())
    assert out.returncode == 0, out.stderr
    text, has_torch, engine_modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert text == reference['prompts'][1]
    assert not has_torch and engine_modules == []


def test_serve_cfg_unknown_key_is_an_error_before_starting():
    with pytest.raises(ValueError, match="unknown serve_cfg option.*'max_batchsize'"):
        LMDeployServer(path='/nonexistent', serve_cfg=dict(max_batchsize=4))


def test_serve_cfg_keys_are_flags_of_the_real_cli():
    from lmwrap.server import SERVE_OPTIONS, serve_flags
    from lmwrap_engine import TurbomindEngineConfig
    from lmwrap_engine.cli import build_parser

    parser = build_parser()
    samples = dict(backend='pytorch', dtype='float32', device='cpu', cache_max_entry_count=0.5,
                   session_idle_timeout=60.0, api_keys='a,b')
    for key, kind in SERVE_OPTIONS.items():
        value = samples.get(key, dict(value=2, list=['a', 'b'], flag=True, bool=False)[kind])
        # argparse exits on an unknown flag or a bad value
        parser.parse_args(['serve', 'api_server', 'some-model', *serve_flags({key: value})])
    flags = serve_flags(dict(backend_config=TurbomindEngineConfig(session_len=64, cache_block_seq_len=16),
                             api_keys='k1, k2', enable_prefix_caching=False))
    assert flags == ['--api-keys', 'k1', 'k2', '--no-enable-prefix-caching', '--session-len', '64',
                     '--cache-block-seq-len', '16']
    args = parser.parse_args(['serve', 'api_server', 'm', *flags])
    assert (args.session_len, args.cache_block_seq_len, args.api_keys) == (64, 16, ['k1', 'k2'])
    assert args.enable_prefix_caching is False
    assert parser.parse_args(['serve', 'api_server', 'm', *serve_flags(dict(enable_prefix_caching=True))]
                             ).enable_prefix_caching is True


def test_server_with_a_missing_model_fails_fast_with_the_childs_message(tmp_path):
    missing = str(tmp_path / 'no-such-model')
    with pytest.raises(RuntimeError, match='exited with code') as error:
        LMDeployServer(path=missing, serve_cfg=dict(dtype='float32'), start_timeout=300)
    message = str(error.value)
    assert 'no-such-model' in message.split('--- its output')[1]  # the child's own words


def test_the_child_stops_on_close(model_path):
    server = LMDeployServer(path=model_path, serve_cfg=ENGINE, meta_template=CHATML_META, **GREEDY)
    pid = server.process.pid
    assert server.is_running and _alive(pid)
    server.close()
    server.close()  # twice is fine
    assert not server.is_running and not _alive(pid)
    assert not os.path.exists(server.log_path)


PARENT = '''
import sys, threading, time
import requests
from lmwrap import LMDeployServer
start = lambda: LMDeployServer(path=sys.argv[1], serve_cfg=dict(dtype='float32', num_gpu_blocks=16,
                                                                cache_block_seq_len=16))
if sys.argv[2] == 'thread':  # PR_SET_PDEATHSIG cannot be used there: the watchdog stops the child
    box = []
    thread = threading.Thread(target=lambda: box.append(start()))
    thread.start()
    thread.join()
    server = box[0]
else:
    server = start()
assert requests.get(server.url + '/health').status_code == 200  # alive after the starting thread ended
print(server.process.pid, flush=True)
time.sleep(600)
'''


@pytest.mark.parametrize('where', ['main', 'thread'])
def test_the_child_stops_when_its_parent_is_killed(model_path, where):
    parent = subprocess.Popen([sys.executable, '-c', PARENT, model_path, where], stdout=subprocess.PIPE, text=True,
                              cwd=_repo_root())
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_gone(child, 60), f'the api_server {child} outlived its killed parent'
    finally:
        parent.kill()
        parent.wait()


# -- a lagent agent through LMDeployServer ------------------------------------------------------------

@pytest.fixture(scope='module')
def agent_llm(request):
    """LMDeployServer on test_lagent_agents' taught tiny model (it answers the agents' prompts with a tool call,
    then with the final answer)."""
    pytest.importorskip('lagent')
    import test_lagent_agents as agents
    from meta_templates import INTERNLM2_META

    model = request.getfixturevalue('agent_model_dir')
    with build_llm(dict(type='LMDeployServer', path=model, meta_template=INTERNLM2_META,
                        serve_cfg=dict(dtype='float32', session_len=4096), **agents.GEN)) as llm:
        assert type(llm) is LMDeployServer
        yield llm


try:  # test_lagent_agents' fixtures (the taught model, the tool executor, the protocol), shared
    from test_lagent_agents import agent_model_dir, executor, internlm2_protocol  # noqa: F401
except (ImportError, pytest.skip.Exception):  # no lagent: the agent tests skip
    pass


def test_react_agent_through_lmdeploy_server(agent_llm, executor):
    from lagent.agents import ReAct
    from lagent.schema import ActionStatusCode

    import test_lagent_agents as agents

    result = ReAct(llm=agent_llm, action_executor=executor).chat(agents.QUESTION)
    assert [a.type for a in result.actions] == ['PythonInterpreter', 'FinishAction']
    assert result.actions[0].state == ActionStatusCode.SUCCESS
    assert result.actions[0].result == [dict(type='text', content='42')]
    assert result.response == ' 42'


def test_internlm2_agent_streams_through_lmdeploy_server(agent_llm, executor, internlm2_protocol):
    from lagent.agents import Internlm2Agent
    from lagent.schema import AgentStatusCode

    import test_lagent_agents as agents

    agent = Internlm2Agent(llm=agent_llm, plugin_executor=executor, protocol=internlm2_protocol)
    states, last = [], None
    for agent_return in agent.stream_chat(agents.QUESTION):
        states.append(agent_return.state)
        last = agent_return
    phases = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert phases == [AgentStatusCode.STREAM_ING, AgentStatusCode.PLUGIN_START, AgentStatusCode.PLUGIN_END,
                      AgentStatusCode.PLUGIN_RETURN, AgentStatusCode.STREAM_ING, AgentStatusCode.END], phases
    assert last.response == agents.PLUGIN_FINISH
    assert last.actions[0].result == [dict(type='text', content='42')]
    # A request the server rejects ends the agent's stream with the negative status.
    returns = list(agent.stream_chat(agents.QUESTION, top_p=7.0))
    assert [r.state for r in returns] == [AgentStatusCode.SESSION_INVALID_ARG]


# -- helpers --------------------------------------------------------------------------------------------

def _cli_flags(options):
    from lmwrap.server import serve_flags
    return serve_flags(options)


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        with open(f'/proc/{pid}/stat') as stat:
            return stat.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _wait_gone(pid: int, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False
