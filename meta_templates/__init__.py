"""Meta templates (lagent's role-dict prompt format) for the model families lmwrap serves."""
from .chatml import CHATML_META, SMOLLM2_META
from .internlm2 import INTERNLM2_META
from .llama2 import LLAMA2_META
from .llama3 import LLAMA3_META
from .qwen import QWEN_META
from .registry import (META_TEMPLATES, get_meta_template, get_stop_words, meta_template_name_for,
                       pick_meta_template)

__all__ = [
    'INTERNLM2_META', 'CHATML_META', 'QWEN_META', 'LLAMA3_META', 'LLAMA2_META', 'SMOLLM2_META',
    'META_TEMPLATES', 'get_meta_template', 'get_stop_words', 'meta_template_name_for', 'pick_meta_template',
]
