"""lmwrap: one LLM interface for agents (lagent first), with the model in this process, in a server
we start, behind someone else's server, or behind Triton; which one is a matter of configuration.

Adapter classes are imported on first use, so ``import lmwrap`` needs neither torch nor any
client library.
"""
import importlib
from typing import Any, Dict, Union

from .base import AsyncBaseLLM, BaseLLM, LLMError, ModelStatusCode
from .prompt import LMTemplateParser, trim_stop_words

# Adapter type name -> module that defines it. Imported only when asked for.
ADAPTERS = {
    'LMDeployPipeline': 'lmwrap.pipeline',
    'AsyncLMDeployPipeline': 'lmwrap.pipeline',
    'LMDeployServer': 'lmwrap.server',
    'AsyncLMDeployServer': 'lmwrap.server',
    'LMDeployClient': 'lmwrap.client',
    'AsyncLMDeployClient': 'lmwrap.client',
    'TritonClient': 'lmwrap.triton',
}

__all__ = ['BaseLLM', 'AsyncBaseLLM', 'LLMError', 'ModelStatusCode', 'LMTemplateParser', 'trim_stop_words',
           'build_llm', 'ADAPTERS']


def __getattr__(name: str):
    if name not in ADAPTERS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    module_name = ADAPTERS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # a dependency of the adapter is missing: that error names it
        raise ImportError(f'{name} is not available: this lmwrap has no {module_name} module') from error
    return getattr(module, name)


def build_llm(config: Union[Dict[str, Any], BaseLLM]) -> BaseLLM:
    """Builds an adapter from a config dict; an already built adapter is returned as is.

    ``config['type']`` is an adapter name (``'LMDeployPipeline'``, ``'LMDeployServer'``,
    ``'LMDeployClient'``, ``'TritonClient'``, ...), a dotted path (``'lmwrap.LMDeployPipeline'``,
    as lagent 0.5's ``create_object`` takes) or a class; the other keys are its constructor's
    arguments. So one dict serves every adapter: change ``type`` (and the location keys).
    """
    if isinstance(config, BaseLLM):
        return config
    if not isinstance(config, dict):
        raise TypeError(f'build_llm takes a config dict (with "type"), got {type(config).__name__}')
    config = dict(config)
    if 'type' not in config:
        raise ValueError(f'an llm config needs a "type" (one of {sorted(ADAPTERS)}), got keys {sorted(config)}')
    llm_class = _resolve_type(config.pop('type'))
    return llm_class(**config)


def _resolve_type(llm_type):
    if isinstance(llm_type, type):
        return llm_type
    if not isinstance(llm_type, str):
        raise TypeError(f'an llm config "type" must be a class or a str, got {type(llm_type).__name__}')
    if llm_type in ADAPTERS:
        return __getattr__(llm_type)
    if '.' in llm_type:
        module_name, _, class_name = llm_type.rpartition('.')
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f'cannot import llm type {llm_type!r}: {error}') from error
    raise ValueError(f'unknown llm type {llm_type!r}; known: {sorted(ADAPTERS)} (or a dotted path or a class)')
