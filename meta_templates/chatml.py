"""ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), as used by SmolLM2, OpenHermes and many fine-tunes.

Plain ChatML has no tool role and no message names: a tool result (lagent's ``environment``
role) is rendered as a user turn, and ``name`` is dropped.
"""

CHATML_META = [
    dict(role='system', begin='<|im_start|>system\n', end='<|im_end|>\n'),
    dict(role='user', begin='<|im_start|>user\n', end='<|im_end|>\n'),
    dict(role='assistant', begin='<|im_start|>assistant\n', end='<|im_end|>\n'),
    dict(role='environment', fallback_role='user'),
]

CHATML_STOP_WORDS = ['<|im_end|>']

# SmolLM2-Instruct is trained on plain ChatML (its HF template only adds a default system prompt).
SMOLLM2_META = CHATML_META
SMOLLM2_STOP_WORDS = CHATML_STOP_WORDS
