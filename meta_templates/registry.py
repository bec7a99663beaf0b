"""Meta templates by name, and picking one from a model name or path."""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from .chatml import CHATML_META, CHATML_STOP_WORDS, SMOLLM2_META, SMOLLM2_STOP_WORDS
from .internlm2 import INTERNLM2_META, INTERNLM2_STOP_WORDS
from .llama2 import LLAMA2_META, LLAMA2_STOP_WORDS
from .llama3 import LLAMA3_META, LLAMA3_STOP_WORDS
from .qwen import QWEN_META, QWEN_STOP_WORDS

# name -> (meta template, stop words that end an assistant turn)
META_TEMPLATES: Dict[str, Tuple[List[dict], List[str]]] = {
    'internlm2': (INTERNLM2_META, INTERNLM2_STOP_WORDS),
    'chatml': (CHATML_META, CHATML_STOP_WORDS),
    'qwen': (QWEN_META, QWEN_STOP_WORDS),
    'llama3': (LLAMA3_META, LLAMA3_STOP_WORDS),
    'llama2': (LLAMA2_META, LLAMA2_STOP_WORDS),
    'smollm2': (SMOLLM2_META, SMOLLM2_STOP_WORDS),
}

# Most specific first; matched against the lower-cased path components, last component first.
_NAME_PATTERNS = [
    ('internlm2', re.compile(r'internlm')),
    ('qwen', re.compile(r'qwen')),
    ('llama3', re.compile(r'llama[-_ .]?3')),
    ('llama2', re.compile(r'llama[-_ .]?2')),
    ('smollm2', re.compile(r'smollm')),
    ('chatml', re.compile(r'chatml')),
]
_MODEL_TYPES = {'internlm2': 'internlm2', 'internlm3': 'internlm2', 'qwen2': 'qwen', 'qwen3': 'qwen'}
# Markers of a HF chat template, most specific first.
_CHAT_TEMPLATE_MARKERS = [
    ('llama3', '<|start_header_id|>'),
    ('qwen', '<tool_response>'),
    ('chatml', '<|im_start|>'),
    ('llama2', '[INST]'),
]


def _lookup(name: str) -> Tuple[List[dict], List[str]]:
    if not isinstance(name, str):
        raise TypeError(f'a meta template name must be a str, got {type(name).__name__}')
    try:
        return META_TEMPLATES[name.lower()]
    except KeyError:
        raise ValueError(f'unknown meta template {name!r}; known: {sorted(META_TEMPLATES)}') from None


def get_meta_template(name: str) -> List[dict]:
    """The meta template registered as ``name`` (one of ``META_TEMPLATES``)."""
    return _lookup(name)[0]


def get_stop_words(name: str) -> List[str]:
    """The stop words that end an assistant turn in the meta template ``name``."""
    return list(_lookup(name)[1])


def meta_template_name_for(model: str) -> Optional[str]:
    """Name of the meta template for a model name, a HF folder or a ``.gguf`` file; None if unknown.

    Tries the path's components (last first) against known family names, then a folder's
    ``config.json`` ``model_type`` and the chat template of its tokenizer (or of the GGUF file).
    """
    if not isinstance(model, str) or not model:
        raise TypeError(f'model must be a non-empty str (a name or a path), got {model!r}')
    for part in reversed(re.split(r'[\\/]+', model.lower())):
        for name, pattern in _NAME_PATTERNS:
            if pattern.search(part):
                return name
    if os.path.isdir(model):
        return _name_from_folder(model)
    if model.endswith('.gguf') and os.path.isfile(model):
        return _name_from_chat_template(_gguf_chat_template(model))
    return None


def pick_meta_template(model: str) -> List[dict]:
    """The meta template for a model name or path (see ``meta_template_name_for``)."""
    name = meta_template_name_for(model)
    if name is None:
        raise ValueError(f'cannot tell which meta template {model!r} needs; pass meta_template= one of '
                         f'{sorted(META_TEMPLATES)} or a list of role dicts')
    return get_meta_template(name)


def _name_from_folder(path: str) -> Optional[str]:
    config = _read_json(os.path.join(path, 'config.json'))
    model_type = config.get('model_type', '')
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    template = _read_json(os.path.join(path, 'tokenizer_config.json')).get('chat_template')
    if template is None and os.path.isfile(os.path.join(path, 'chat_template.jinja')):
        with open(os.path.join(path, 'chat_template.jinja'), encoding='utf-8') as f:
            template = f.read()
    return _name_from_chat_template(template)


def _name_from_chat_template(template) -> Optional[str]:
    if isinstance(template, list):  # HF allows a list of named templates
        template = next((t.get('template') for t in template if t.get('name') == 'default'), None)
    if not isinstance(template, str):
        return None
    for name, marker in _CHAT_TEMPLATE_MARKERS:
        if marker in template:
            return name
    return None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def _gguf_chat_template(path: str) -> Optional[str]:
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(path).fields.get('tokenizer.chat_template')
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode('utf-8')
