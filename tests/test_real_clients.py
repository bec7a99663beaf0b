"""The real third-party HTTP clients, unchanged, against ``lmwrap serve api_server``: lmdeploy 0.5.1's
``APIClient`` and lagent 0.2.4's ``LMDeployClient``. They live in their own virtualenv
(``scripts/real_clients_venv.sh``, cached under the user cache folder), so each check runs a small
script with that venv's python; their texts must equal the in-process greedy reference."""
import json
import os
import subprocess

import pytest

from lmwrap import LMDeployPipeline
from meta_templates import CHATML_META
from serving import running_server

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['The capital of France is', 'hello world, this']
DIALOG = [dict(role='system', content='You are terse.'), dict(role='user', content='Name a river.')]
GREEDY = dict(max_new_tokens=24, top_k=1, temperature=0)
ENGINE = dict(dtype='float32', num_gpu_blocks=32, cache_block_seq_len=16)
SERVER_FLAGS = ('--dtype', 'float32', '--num-gpu-blocks', '32', '--cache-block-seq-len', '16')


@pytest.fixture(scope='session')
def venv_python():
    """The real clients' python: the venv is made once (minutes the first time), then reused."""
    out = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'real_clients_venv.sh')], capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    python = out.stdout.strip().splitlines()[-1]
    assert os.access(python, os.X_OK), python
    return python


@pytest.fixture(scope='module')
def reference(model_dir):
    with LMDeployPipeline(model_dir, meta_template=CHATML_META, pipeline_cfg=ENGINE, **GREEDY) as llm:
        full = llm.chat(DIALOG)
        assert len(full) >= 6, full  # long enough to hold a stop word in its middle
        stop = full[len(full) // 2:len(full) // 2 + 2]
        return dict(prompts=llm.generate(PROMPTS), chat=full, stop=stop,
                    stopped=llm.chat(DIALOG, stop_words=[stop]),
                    prompt=llm.template_parser(DIALOG))


@pytest.fixture(scope='module')
def server(model_dir, reference, venv_python):
    with running_server(model_dir, *SERVER_FLAGS) as (url, _):
        yield url


def run_script(python: str, script: str, *args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env['CUDA_VISIBLE_DEVICES'] = ''
    out = subprocess.run([python, '-c', script, *args], capture_output=True, text=True, timeout=300, env=env,
                         cwd='/')  # not the repo: the venv must not see our packages
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LMDEPLOY_API_CLIENT = '''
import json, sys
from lmdeploy.serve.openai.api_client import APIClient
url, prompt, messages = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
api = APIClient(url)
model = api.available_models[0]
greedy = dict(max_tokens=24, top_k=1, temperature=0)
# as lagent's reference: special tokens kept
(reply,) = list(api.completions_v1(model, prompt, skip_special_tokens=False, **greedy))
chunks = list(api.completions_v1(model, prompt, stream=True, skip_special_tokens=False, **greedy))
(chat,) = list(api.chat_completions_v1(model, messages, **greedy))
chat_chunks = list(api.chat_completions_v1(model, messages, stream=True, **greedy))
turn = dict(request_output_len=24, top_k=1, temperature=0)
(first,) = list(api.chat_interactive_v1(messages, session_id=7, interactive_mode=True, **turn))
api.end_session(7)
(again,) = list(api.chat_interactive_v1(messages, session_id=7, stream=False, **turn))
ids, length = api.encode(prompt, add_bos=True)
print(json.dumps(dict(
    models=api.available_models,
    completion=reply['choices'][0]['text'],
    streamed=''.join(c['choices'][0]['text'] for c in chunks),
    chat=chat['choices'][0]['message']['content'],
    chat_streamed=''.join(c['choices'][0]['delta'].get('content') or '' for c in chat_chunks),
    interactive=[first['text'], again['text'], again['history_tokens']],
    ids=ids, length=length)))
'''


def test_lmdeploys_api_client(venv_python, server, model_dir, reference):
    from lmwrap_engine import GenerationConfig, pipeline
    from tiny_models import tiny_config

    result = run_script(venv_python, LMDEPLOY_API_CLIENT, server, PROMPTS[0], json.dumps(DIALOG[1:]))
    assert result['models'] == [model_dir]
    assert result['completion'] == result['streamed'] == reference['prompts'][0]
    with pipeline(model_dir, tiny_config()) as pipe:  # the chat routes apply the engine's chat template
        chat = pipe([DIALOG[1:]], gen_config=GenerationConfig(max_new_tokens=24, top_k=1, do_sample=False))[0].text
        ids = pipe.encode_prompt(PROMPTS[0], sequence_start=True, do_preprocess=False)
    assert result['chat'] == result['chat_streamed'] == chat
    assert result['interactive'] == [chat, chat, 0]  # ended by end_session: the second is a fresh session
    assert result['ids'] == ids and result['length'] == len(ids)


LAGENT_CLIENT = '''
import json, sys
from lagent.llms import LMDeployClient
from lagent.schema import ModelStatusCode
url, model, prompts, dialog, meta, stop = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6]), sys.argv[6]
llm = LMDeployClient(url=url, model_name=model, meta_template=meta, max_new_tokens=24, top_k=1, temperature=0,
                     stop_words=['<|im_end|>'])
one = llm.generate(prompts[0])
batch = llm.generate(prompts)
chat = llm.chat(dialog)
# lagent's stream_chat cuts at the constructor's stop words only (not a per-call stop_words)
stopping = LMDeployClient(url=url, model_name=model, meta_template=meta, max_new_tokens=24, top_k=1, temperature=0,
                          stop_words=[stop])
items = list(stopping.stream_chat(dialog))
print(json.dumps(dict(one=one, batch=batch, chat=chat, stream=[[int(s), t] for s, t, _ in items],
                      end=items[-1][0] == ModelStatusCode.END)))
'''


def test_lagents_lmdeploy_client(venv_python, server, model_dir, reference):
    result = run_script(venv_python, LAGENT_CLIENT, server, model_dir, json.dumps(PROMPTS), json.dumps(DIALOG),
                        json.dumps(CHATML_META), reference['stop'])
    assert result['one'] == reference['prompts'][0]
    assert result['batch'] == reference['prompts']
    assert result['chat'] == reference['chat']
    stream = result['stream']
    assert result['end'] and stream[-1][1] == reference['stopped'] != reference['chat']
    assert all(status == 1 for status, _ in stream[:-1]) and len(stream) > 2
