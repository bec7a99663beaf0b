"""Qwen2 / Qwen2.5 / Qwen3: ChatML, with tool results wrapped as Qwen's chat template does
(a user turn holding ``<tool_response>...</tool_response>``)."""

QWEN_META = [
    dict(role='system', begin='<|im_start|>system\n', end='<|im_end|>\n'),
    dict(role='user', begin='<|im_start|>user\n', end='<|im_end|>\n'),
    dict(role='assistant', begin='<|im_start|>assistant\n', end='<|im_end|>\n'),
    dict(role='environment', begin='<|im_start|>user\n<tool_response>\n', end='\n</tool_response><|im_end|>\n'),
]

QWEN_STOP_WORDS = ['<|im_end|>', '<|endoftext|>']
