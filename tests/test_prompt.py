"""The meta-template parser (lagent 0.2.4's semantics) and stop-word trimming."""
import pytest

from lmwrap.prompt import LMTemplateParser, held_back_len, trim_stop_words
from meta_templates import INTERNLM2_META

# A template using every feature of the format: str and dict begins, names, fallback_role, generate.
FULL_META = [
    dict(role='system', begin='<S>', end='</S>\n'),
    dict(role='user', begin=dict(with_name='<U name={name}>', without_name='<U>', name={'bob': 'BOB'}),
         end='</U>\n'),
    dict(role='assistant', begin='<A>', end='</A>\n', generate=True),
    dict(role='environment', fallback_role='user'),
    dict(role='function', begin='<F>', end='</F>\n'),
]

DIALOGS = [
    [dict(role='user', content='hi')],
    [dict(role='system', content='be nice'), dict(role='user', content='hi')],
    [dict(role='user', content='hi'), dict(role='assistant', content='hello')],
    [dict(role='user', content='2+2?'), dict(role='assistant', content='4'), dict(role='user', content='3+3?')],
    [dict(role='system', content='tools', name='plugin'), dict(role='user', content='q', name='bob'),
     dict(role='environment', content='obs', name='plugin'), dict(role='environment', content='x', name='alice')],
    ['raw prefix ', dict(role='user', content='u'), ' raw middle ', dict(role='assistant', content='a')],
    [dict(role='user', content='u'), 'raw tail'],
    [dict(role='function', content='f()')],
    [dict(role='user')],
    [dict(role='user', content='ünïcödé 你好 🙂\n\n'), dict(role='assistant', content='')],
]


def test_internlm2_examples_from_compat_doc():
    parser = LMTemplateParser(INTERNLM2_META)
    assert parser([dict(role='system', content='S'), dict(role='user', content='U')]) == (
        '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n')
    assert parser([dict(role='system', name='plugin', content='P')]).startswith('<|im_start|>system name=<|plugin|>\n')
    assert parser([dict(role='environment', name='foo', content='R')]).startswith(
        '<|im_start|>environment name=foo\nR<|im_end|>\n')


def test_final_assistant_message_closes_without_opening_another_turn():
    parser = LMTemplateParser(INTERNLM2_META)
    prompt = parser([dict(role='user', content='U'), dict(role='assistant', content='A')])
    assert prompt == '<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n'


def test_generate_leaves_the_last_turn_open_and_fallback_role_borrows_the_config():
    parser = LMTemplateParser(FULL_META)
    assert parser([dict(role='user', content='u'), dict(role='assistant', content='par')]) == '<U>u</U>\n<A>par'
    assert parser([dict(role='environment', content='e', name='bob')]) == '<U name=BOB>e</U>\n<A>'
    assert parser([dict(role='system', content='s', name='ignored')]) == '<S>s</S>\n<A>'


def test_a_str_dialog_is_returned_unchanged():
    assert LMTemplateParser(INTERNLM2_META)('already a prompt') == 'already a prompt'
    assert LMTemplateParser(None)('already a prompt') == 'already a prompt'


def test_without_a_meta_template_contents_are_joined_by_newlines():
    # lagent 0.2.4 reads item['prompt'] here and so loses every message; we use the content.
    parser = LMTemplateParser(None)
    dialog = [dict(role='system', content='S'), dict(role='user', content=''), 'raw', dict(role='user', content='U')]
    assert parser(dialog) == 'S\nraw\nU'
    assert LMTemplateParser([])(dialog) == 'S\nraw\nU'


def _uses_function_role(dialog):
    return any(isinstance(m, dict) and m['role'] == 'function' for m in dialog)


@pytest.mark.parametrize('meta_name,dialog_index', [('FULL_META', i) for i in range(len(DIALOGS))] + [
    ('INTERNLM2_META', i) for i, d in enumerate(DIALOGS) if not _uses_function_role(d)])
def test_byte_identical_to_lagent_parser(meta_name, dialog_index):
    base_llm = pytest.importorskip('lagent.llms.base_llm')
    meta = INTERNLM2_META if meta_name == 'INTERNLM2_META' else FULL_META
    dialog = DIALOGS[dialog_index]
    if meta_name == 'FULL_META' and dialog_index == 4:
        dialog = [m for m in dialog if m.get('role') != 'system']  # lagent crashes on a name with a str begin
    ours = LMTemplateParser(meta)(dialog)
    assert ours == base_llm.LMTemplateParser(meta)(dialog)
    assert isinstance(ours, str) and ours


def test_every_registered_template_matches_lagent_on_agent_shaped_dialogs():
    base_llm = pytest.importorskip('lagent.llms.base_llm')
    from meta_templates import META_TEMPLATES

    dialogs = [d for d in DIALOGS if not _uses_function_role(d)]
    for name, (meta, _) in META_TEMPLATES.items():
        for dialog in dialogs:
            if any(isinstance(m, dict) and 'name' in m and isinstance(_role(meta, m['role'])['begin'], str)
                   for m in dialog):
                continue  # lagent crashes there; covered by the name test below
            assert LMTemplateParser(meta)(dialog) == base_llm.LMTemplateParser(meta)(dialog), (name, dialog)


def _role(meta, role):
    cfg = next(item for item in meta if item['role'] == role)
    return next(item for item in meta if item['role'] == cfg['fallback_role']) if cfg.get('fallback_role') else cfg


def test_bad_dialogs_get_clear_errors():
    parser = LMTemplateParser(INTERNLM2_META)
    with pytest.raises(ValueError, match="unknown role 'wizard'.*'assistant'"):
        parser([dict(role='wizard', content='x')])
    with pytest.raises(TypeError, match='a message must be a dict.*int'):
        parser([dict(role='user', content='x'), 42])
    with pytest.raises(TypeError, match='a dialog must be a str or a list'):
        parser(dict(role='user', content='x'))
    with pytest.raises(ValueError, match='has no "role"'):
        parser([dict(content='x')])
    with pytest.raises(TypeError, match='content must be a str'):
        parser([dict(role='user', content=['x'])])
    with pytest.raises(ValueError, match='unknown role'):  # the no-template path checks messages too
        LMTemplateParser(INTERNLM2_META)([dict(role='nobody')])
    with pytest.raises(TypeError, match='a message must be a dict'):
        LMTemplateParser(None)([None])


def test_bad_meta_templates_get_clear_errors():
    with pytest.raises(ValueError, match="role 'user' appears twice"):
        LMTemplateParser([dict(role='user'), dict(role='user'), dict(role='assistant')])
    with pytest.raises(ValueError, match='needs an "assistant" role'):
        LMTemplateParser([dict(role='user', begin='', end='')])
    with pytest.raises(ValueError, match="falls back to 'ghost'"):
        LMTemplateParser([dict(role='assistant'), dict(role='tool', fallback_role='ghost')])
    with pytest.raises(TypeError, match='list of role dicts'):
        LMTemplateParser(['not a dict'])
    with pytest.raises(ValueError, match='has no "role"'):
        LMTemplateParser([dict(begin='x')])


def test_trim_cuts_at_the_first_occurrence():
    assert trim_stop_words('answer<|im_end|>junk<|im_end|>', ['<|im_end|>']) == 'answer'
    assert trim_stop_words('a STOP b END c', ['END', 'STOP']) == 'a '
    assert trim_stop_words('nothing to cut', ['<|im_end|>']) == 'nothing to cut'
    assert trim_stop_words('STOP', ['STOP']) == ''
    assert trim_stop_words(['x<e>y', 'z', '<e>'], ['<e>']) == ['x', 'z', '']
    assert trim_stop_words('keep<e>', None) == 'keep<e>'
    assert trim_stop_words('keep<e>', []) == 'keep<e>'


def test_trim_uses_the_stop_word_completed_first_so_streaming_agrees():
    # 'c' is completed before 'abcd' is: a streaming engine stops there, and so do we.
    assert trim_stop_words('xabcd', ['abcd', 'c']) == 'xab'
    text, words = 'one two <|im_end|> three', ['two <|im', '<|im_end|>', 'e t']
    whole = trim_stop_words(text, words)
    assert whole == 'on'
    for end in range(len(text) + 1):  # every prefix that already shows a stop word trims the same
        prefix = text[:end]
        if trim_stop_words(prefix, words) != prefix:
            assert trim_stop_words(prefix, words) == whole


def test_held_back_len_hides_a_partial_stop_word():
    assert held_back_len('hello <|im_', ['<|im_end|>']) == len('<|im_')
    assert held_back_len('hello <', ['<|im_end|>', 'END']) == 1
    assert held_back_len('hello EN', ['<|im_end|>', 'END']) == 2
    assert held_back_len('hello', ['<|im_end|>']) == 0
    assert held_back_len('hello', None) == 0
    assert held_back_len('<|im_end', ['<|im_end|>']) == len('<|im_end')
