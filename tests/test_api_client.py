"""lmwrap_engine.serve.api_client.APIClient (lmdeploy's APIClient) against a real ``lmwrap serve api_server``:
every method, streaming and not, the same greedy text as the in-process pipeline, keys and errors."""
import os
import subprocess
import sys

import pytest

from lmwrap_engine import GenerationConfig
from lmwrap_engine.serve.api_client import APIClient, APIError, client
from serving import running_server
from tiny_models import tiny_config

GREEDY = dict(max_tokens=12, top_k=1, temperature=0)
PIPE_GREEDY = GenerationConfig(max_new_tokens=12, top_k=1, do_sample=False)
PROMPT = 'The capital of France is'
MESSAGES = [dict(role='user', content='Name a river.')]
SERVER_FLAGS = ('--dtype', 'float32', '--num-gpu-blocks', '32', '--cache-block-seq-len', '16')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def reference(model_dir):
    """The in-process pipeline's greedy answers, computed before the server starts (to spare the CPU)."""
    from lmwrap_engine import pipeline

    with pipeline(model_dir, tiny_config()) as pipe:
        session = pipe.chat('Name a river.', gen_config=GenerationConfig(max_new_tokens=8, top_k=1, do_sample=False))
        first = session.response.text
        second = pipe.chat('And another one.', session=session,
                           gen_config=GenerationConfig(max_new_tokens=8, top_k=1, do_sample=False)).response.text
        session.close()
        return dict(raw=pipe(PROMPT, gen_config=PIPE_GREEDY, do_preprocess=False).text,
                    chat=pipe([MESSAGES], gen_config=PIPE_GREEDY)[0].text,
                    ids=pipe.encode_prompt(PROMPT, sequence_start=True, do_preprocess=False),
                    ids_no_bos=pipe.encode_prompt(PROMPT, sequence_start=False, do_preprocess=False),
                    templated_ids=pipe.encode_prompt(PROMPT, sequence_start=True, do_preprocess=True),
                    interactive=[first, second])


@pytest.fixture(scope='module')
def server(model_dir, reference):
    with running_server(model_dir, *SERVER_FLAGS, '--api-keys', 'k1,k2') as (url, proc):
        yield url


@pytest.fixture()
def api(server):
    with APIClient(server, api_key='k2', timeout=120) as api:
        yield api


def test_available_models_is_the_served_name(api, model_dir):
    assert api.available_models == [model_dir]
    assert api.available_models is api.available_models  # asked once, then cached


def test_encode(api, reference):
    assert api.encode(PROMPT) == (reference['ids'], len(reference['ids']))
    assert api.encode(PROMPT, add_bos=False)[0] == reference['ids_no_bos']
    assert api.encode(PROMPT, do_preprocess=True)[0] == reference['templated_ids']
    ids, lengths = api.encode([PROMPT, 'hello'])
    assert ids[0] == reference['ids'] and lengths == [len(i) for i in ids]


def test_completions_v1_stream_and_not_give_the_pipelines_text(api, model_dir, reference):
    (reply,) = list(api.completions_v1(model_dir, PROMPT, **GREEDY))
    assert reply['object'] == 'text_completion'
    assert reply['choices'][0]['text'] == reference['raw']
    assert reply['usage']['completion_tokens'] > 0
    chunks = list(api.completions_v1(model_dir, PROMPT, stream=True, **GREEDY))
    assert len(chunks) > 2 and all(isinstance(c, dict) for c in chunks)  # parsed SSE, [DONE] dropped
    assert ''.join(c['choices'][0]['text'] for c in chunks) == reference['raw']
    assert chunks[-1]['choices'][0]['finish_reason'] in ('stop', 'length')
    (batch,) = list(api.completions_v1(model_dir, [PROMPT, PROMPT], **GREEDY))
    assert [c['text'] for c in batch['choices']] == [reference['raw']] * 2


def test_extra_keyword_arguments_reach_the_server(api, model_dir):
    # lmdeploy's client nests them in an ignored "kwargs" object; ours sends them as fields.
    chunks = list(api.completions_v1(model_dir, PROMPT, stream=True, stream_options=dict(include_usage=True),
                                     **GREEDY))
    assert chunks[-1]['choices'] == [] and chunks[-1]['usage']['completion_tokens'] > 0


def test_chat_completions_v1_applies_the_chat_template(api, model_dir, reference):
    (reply,) = list(api.chat_completions_v1(model_dir, MESSAGES, **GREEDY))
    assert reply['choices'][0]['message']['content'] == reference['chat']
    chunks = list(api.chat_completions_v1(model_dir, MESSAGES, stream=True, **GREEDY))
    text = ''.join(c['choices'][0]['delta'].get('content') or '' for c in chunks)
    assert text == reference['chat']


def test_chat_interactive_keeps_the_session_until_end_session(api, reference):
    turn = dict(request_output_len=8, top_k=1, temperature=0)
    (first,) = list(api.chat_interactive_v1('Name a river.', session_id=41, interactive_mode=True, **turn))
    streamed = list(api.chat_interactive_v1('And another one.', session_id=41, interactive_mode=True, stream=True,
                                            **turn))
    assert [first['text'], ''.join(item['text'] for item in streamed)] == reference['interactive']
    assert first['history_tokens'] == 0 and streamed[-1]['history_tokens'] > first['input_tokens']
    api.end_session(41)
    (again,) = list(api.chat_interactive_v1('And another one.', session_id=41, **turn))
    assert again['history_tokens'] == 0  # ended: a fresh session


def test_chat_is_lmdeploys_interactive_turn(api, reference):
    turns = list(api.chat('Name a river.', session_id=42, request_output_len=8, top_k=1, temperature=0))
    assert len(turns) == 1
    text, tokens, finish_reason = turns[0]
    assert text == reference['interactive'][0] and tokens > 0 and finish_reason in ('stop', 'length')
    streamed = list(api.chat('And another one.', session_id=42, stream=True, request_output_len=8, top_k=1,
                             temperature=0))
    assert ''.join(t for t, _, _ in streamed) == reference['interactive'][1]
    api.end_session(42)


def test_errors_are_yielded_as_lmdeploy_does_or_raised_on_request(server, model_dir):
    with APIClient(server, api_key='k1') as api:
        (reply,) = list(api.completions_v1('no-such-model', PROMPT))
        assert reply['code'] == 404 and 'no-such-model' in reply['message']
    with APIClient(server, api_key='k1', raise_on_error=True) as api:
        with pytest.raises(APIError, match='HTTP 400.*top_p') as error:
            list(api.completions_v1(model_dir, PROMPT, top_p=7.0))
        assert error.value.status_code == 400
    with APIClient(server, raise_on_error=True) as api:  # no key
        with pytest.raises(APIError, match='HTTP 401') as error:
            api.available_models
        assert error.value.status_code == 401


def test_client_function_builds_an_api_client(server):
    api = client(server, api_key='k1')
    assert isinstance(api, APIClient) and api.api_server_url == server
    assert APIClient().api_server_url == 'http://127.0.0.1:23333'


def test_the_module_imports_without_torch():
    """api_client.py itself needs only requests (loaded from its file: the package's __init__ is separate)."""
    path = os.path.join(REPO, 'lmwrap_engine', 'serve', 'api_client.py')
    script = f'''
import sys, importlib.util
sys.modules['torch'] = None
spec = importlib.util.spec_from_file_location('api_client', {path!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
heavy = ('torch', 'transformers', 'lmwrap_engine')
print(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in heavy))
'''
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]'


def test_the_package_path_imports_without_torch():
    """``from lmwrap_engine.serve.api_client import APIClient`` and ``lmwrap_engine.client`` in a thin install."""
    script = '''
import sys
sys.modules['torch'] = None
from lmwrap_engine.serve.api_client import APIClient
import lmwrap_engine
assert isinstance(lmwrap_engine.client('http://127.0.0.1:1'), APIClient)
print('ok')
'''
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]
