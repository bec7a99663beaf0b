"""Llama 3 / 3.1 / 3.2 Instruct. ``<|begin_of_text|>`` is left out: the tokenizer adds it as BOS.
Tool results use Llama 3.1's ``ipython`` role."""

LLAMA3_META = [
    dict(role='system', begin='<|start_header_id|>system<|end_header_id|>\n\n', end='<|eot_id|>'),
    dict(role='user', begin='<|start_header_id|>user<|end_header_id|>\n\n', end='<|eot_id|>'),
    dict(role='assistant', begin='<|start_header_id|>assistant<|end_header_id|>\n\n', end='<|eot_id|>'),
    dict(role='environment', begin='<|start_header_id|>ipython<|end_header_id|>\n\n', end='<|eot_id|>'),
]

LLAMA3_STOP_WORDS = ['<|eot_id|>', '<|end_of_text|>']
