"""Llama 2 chat, laid out as lmdeploy's ``llama2`` chat template: the system prompt opens the
first ``[INST]`` and each answer closes with ``</s><s>[INST] ``. ``<s>`` at the very start is
left out: the tokenizer adds it as BOS.

Like lmdeploy's template (which always inserts a default system prompt), this expects the
dialog to open with a system message; without one, the first turn lacks ``[INST] ``.
"""

LLAMA2_META = [
    dict(role='system', begin='[INST] <<SYS>>\n', end='\n<</SYS>>\n\n'),
    dict(role='user', begin='', end=''),
    dict(role='assistant', begin=' [/INST] ', end='</s><s>[INST] '),
    dict(role='environment', fallback_role='user'),
]

LLAMA2_STOP_WORDS = ['</s>']
