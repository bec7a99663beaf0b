"""Prompts with images: ``(text, image)``, ``(text, [images])`` and OpenAI messages whose content mixes
``text`` and ``image_url`` parts (also lmdeploy's ``image_data``) -> templated text + images -> ids + items."""
from __future__ import annotations

from typing import List, Tuple

from .image import load_image
from .items import IMAGE_TOKEN

_URL_PREFIXES = ("http://", "https://", "data:", "file://")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
IMAGE_PART_TYPES = ("image_url", "image_data", "image")


def _is_image(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image) or (isinstance(x, str) and (
        x.startswith(_URL_PREFIXES) or x.lower().endswith(_IMAGE_SUFFIXES)))


def is_image_prompt(prompt) -> bool:
    """``(text, image)`` or ``(text, [images])``: a tuple whose second element is an image or a list of them
    (a PIL image, a path object, or a str that is an http(s)/data/file URL or ends in an image suffix)."""
    if not (isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str)):
        return False
    images = prompt[1]
    if isinstance(images, (list, tuple)):
        return all(_is_image(x) or hasattr(x, "__fspath__") for x in images)
    return _is_image(images) or hasattr(images, "__fspath__")


def has_images(prompt) -> bool:
    """Whether a prompt carries images (an image tuple, or messages with image parts)."""
    if is_image_prompt(prompt):
        return True
    if isinstance(prompt, list):
        for m in prompt:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, (list, tuple)) and any(
                    isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content):
                return True
    return False


def to_messages(prompt) -> list:
    if is_image_prompt(prompt):
        text, images = prompt
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return [{"role": "user", "content": [{"type": "text", "text": text}]
                 + [{"type": "image_data", "image_data": {"data": im}} for im in images]}]
    return prompt


def _image_of(part: dict, where: str):
    kind = part["type"]
    value = part.get(kind)
    if kind == "image_url":
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise ValueError(f"{where}: an image_url part needs {{'url': str}}, got {value!r}")
        return load_image(url)
    data = value.get("data") if isinstance(value, dict) else value
    return load_image(data)


def flatten_images(messages: list, place_images) -> Tuple[list, list]:
    """Messages with text content (each message's images placed by ``place_images(text, n)``) and the
    loaded images in prompt order."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            out.append(message)
            continue
        texts, mine = [], []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError(f"messages[{i}] content part {part!r} must be a dict with a 'type'")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}] text part {part!r} needs a str 'text'")
                texts.append(part["text"])
            elif part["type"] in IMAGE_PART_TYPES:
                mine.append(_image_of(part, f"messages[{i}]"))
            else:
                raise ValueError(f"messages[{i}] content part type {part['type']!r} is not supported "
                                 f"(text, image_url)")
        text = "".join(texts)
        if text.count(IMAGE_TOKEN) not in (0, len(mine)):
            raise ValueError(f"messages[{i}] places {text.count(IMAGE_TOKEN)} images ({IMAGE_TOKEN}) "
                             f"but has {len(mine)}")
        images += mine
        out.append({**message, "content": place_images(text, len(mine)) if mine else text})
    return out, images


def encode_with_images(engine, prompt, sequence_start: bool, do_preprocess: bool, tools=None,
                       close_turn: bool = False) -> Tuple[List[int], list]:
    """Token ids and ``MultimodalItem``s of an image prompt for ``engine`` (an ``AsyncEngine``)."""
    processor = engine.vision_processor()
    if not do_preprocess:
        if not is_image_prompt(prompt):
            raise TypeError("with do_preprocess=False an image prompt must be (text, images) with "
                            f"{IMAGE_TOKEN} in the text for each image")
        text, images = prompt
        images = [load_image(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
    else:
        messages, images = flatten_images(to_messages(prompt), processor.place_images)
        text = engine.chat_template.messages2prompt(messages, sequence_start, tools=tools)
        if close_turn and not sequence_start and engine.chat_template.stop_words:
            text = engine.chat_template.stop_words[0] + text
    ids, items = processor.encode(text, images, add_special_tokens=sequence_start)
    bos = engine.tokenizer.bos_token_id
    if len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
        ids = ids[1:]  # the template already wrote the BOS token
        items = [it.shifted(-1) for it in items]
    return ids, items
