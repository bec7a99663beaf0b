"""The meta-template prompt builder every adapter uses, and stop-word trimming."""
from typing import Dict, List, Optional, Sequence, Union

Message = Dict[str, str]
Dialog = List[Union[str, Message]]

# Where an image sits in a prompt (lmdeploy's placeholder; the same string as lmwrap_engine.vl.IMAGE_TOKEN).
IMAGE_TOKEN = '<IMAGE_TOKEN>'
IMAGE_PART_TYPES = ('image_url', 'image_data', 'image')


class ImagePrompt(str):
    """A prompt string with ``IMAGE_TOKEN`` where each of its ``images`` sits (URLs, paths or PIL images,
    in order): what the template parser builds from messages whose content has image parts."""

    def __new__(cls, text: str, images: list):
        obj = super().__new__(cls, text)
        obj.images = list(images)
        return obj


def prompt_images(prompt) -> list:
    """The images of a prompt (``[]`` for a plain str)."""
    return list(getattr(prompt, 'images', None) or [])


def _content_text(message: dict, images: list) -> str:
    """A message's content as text; image parts become ``IMAGE_TOKEN`` lines before the text (lmdeploy's
    rule, unless the text places them itself) and are appended to ``images``."""
    content = message.get('content', '')
    if isinstance(content, str):
        return content
    texts, mine = [], []
    for part in content:
        kind = part.get('type') if isinstance(part, dict) else None
        if kind == 'text' and isinstance(part.get('text'), str):
            texts.append(part['text'])
        elif kind in IMAGE_PART_TYPES:
            value = part.get(kind)
            source = (value.get('url', value.get('data')) if isinstance(value, dict) else value)
            if source is None:
                raise ValueError(f'image part {part!r} names no image (image_url.url)')
            mine.append(source)
        else:
            raise TypeError(f'a content part must be a text or image_url dict, got {part!r}')
    text = ''.join(texts)
    images += mine
    if mine and IMAGE_TOKEN not in text:
        text = f'{IMAGE_TOKEN}\n' * len(mine) + text
    return text


class LMTemplateParser:
    """Renders a dialog (role dicts and raw strings) into one prompt string, as lagent 0.2.4 does.

    Each role of ``meta_template`` has ``begin`` (a str, or a dict with ``with_name`` /
    ``without_name`` / a ``name`` map), ``end``, and optionally ``generate`` (a final message
    of this role is left open) and ``fallback_role`` (render with that role's config). After a
    final non-assistant message the assistant turn is opened. Strings in the dialog are copied
    verbatim. Without a meta template, the non-empty contents are joined with ``'\\n'`` (lagent
    0.2.4 reads a wrong key there and drops every message's content).
    """

    def __init__(self, meta_template: Optional[List[dict]] = None):
        self.meta_template = meta_template
        self.roles: Dict[str, dict] = {}
        if not meta_template:
            return
        if not isinstance(meta_template, list) or not all(isinstance(item, dict) for item in meta_template):
            raise TypeError('meta_template must be a list of role dicts')
        for item in meta_template:
            if 'role' not in item:
                raise ValueError(f'meta template item {item!r} has no "role"')
            if item['role'] in self.roles:
                raise ValueError(f'role {item["role"]!r} appears twice in the meta template')
            self.roles[item['role']] = item.copy()
        if 'assistant' not in self.roles:
            raise ValueError('the meta template needs an "assistant" role (it opens the reply turn)')
        for cfg in self.roles.values():
            fallback = cfg.get('fallback_role')
            if fallback and fallback not in self.roles:
                raise ValueError(f'role {cfg["role"]!r} falls back to {fallback!r}, which the meta template lacks')

    def __call__(self, dialog: Union[str, Dialog]) -> str:
        if isinstance(dialog, str):
            return dialog
        if not isinstance(dialog, list):
            raise TypeError(f'a dialog must be a str or a list of messages, got {type(dialog).__name__}')
        for item in dialog:
            _check_message(item)
        images: list = []
        dialog = [item if isinstance(item, str) else {**item, 'content': _content_text(item, images)}
                  for item in dialog]
        if not self.meta_template:
            parts = [item if isinstance(item, str) else item.get('content', '') for item in dialog]
            text = '\n'.join(part for part in parts if part)
        else:
            last = len(dialog) - 1
            text = ''.join(item if isinstance(item, str) else self._render(item, index == last)
                           for index, item in enumerate(dialog))
        return ImagePrompt(text, images) if images else text

    def _role_config(self, role: str) -> dict:
        if role not in self.roles:
            raise ValueError(f'unknown role {role!r}; the meta template has roles {sorted(self.roles)}')
        cfg = self.roles[role]
        return self.roles[cfg['fallback_role']] if cfg.get('fallback_role') else cfg

    def _render(self, message: Message, last: bool) -> str:
        cfg = self._role_config(message['role'])
        text = _format_begin(cfg, message) + message.get('content', '')
        if last and cfg.get('generate', False):
            return text
        text += cfg.get('end', '')
        if last and cfg['role'] != 'assistant':
            text += _format_begin(self.roles['assistant'], {})
        return text


def _check_message(item) -> None:
    if isinstance(item, str):
        return
    if not isinstance(item, dict):
        raise TypeError(f'a message must be a dict (or a str), got {type(item).__name__}: {item!r}')
    if 'role' not in item:
        raise ValueError(f'message {item!r} has no "role"')
    content = item.get('content', '')
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return  # OpenAI content parts: text and images
    if not isinstance(content, str):
        raise TypeError(f'message content must be a str or a list of content parts, got '
                        f'{type(item["content"]).__name__} in {item!r}')


def _format_begin(cfg: dict, message: Message) -> str:
    begin = cfg.get('begin', '')
    if isinstance(begin, str):  # a plain begin has no slot for a name
        return begin
    name = message.get('name')
    if name is None:
        return begin.get('without_name', '')
    return begin.get('with_name', '').format(name=begin.get('name', {}).get(name, name))


def _stop_at(text: str, stop_words: Sequence[str]) -> Optional[int]:
    """Where to cut ``text``: the start of the stop word that is completed first (as a streaming
    engine would stop), or None."""
    best_end, cut = None, None
    for word in stop_words:
        start = text.find(word)
        if start < 0:
            continue
        end = start + len(word)
        if best_end is None or end < best_end or (end == best_end and start < cut):
            best_end, cut = end, start
    return cut


def trim_stop_words(text: Union[str, List[str]], stop_words: Optional[Sequence[str]]) -> Union[str, List[str]]:
    """Cuts each text before the first stop word in it (a str or a list, returned the same way).

    "First" is the stop word that is completed first, so a text trimmed whole equals the same
    text trimmed while it streams in. ``None`` or ``[]`` leaves the text unchanged.
    """
    if isinstance(text, list):
        return [trim_stop_words(t, stop_words) for t in text]
    if not stop_words:
        return text
    cut = _stop_at(text, stop_words)
    return text if cut is None else text[:cut]


def held_back_len(text: str, stop_words: Optional[Sequence[str]]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop word.

    A stream shows ``text`` without that tail, so a caller never sees half a stop word.
    """
    longest = 0
    for word in stop_words or ():
        for size in range(min(len(word) - 1, len(text)), longest, -1):
            if word.startswith(text[-size:]):
                longest = size
                break
    return longest
