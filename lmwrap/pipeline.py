"""LMDeployPipeline: the model runs in this process, on lmwrap_engine (lmdeploy's pipeline API)."""
import dataclasses
import logging
from dataclasses import fields
from typing import Any, Dict, Iterator, List, Optional

from .base import AsyncBaseLLM, BaseLLM, Delta, LLMError, ModelStatusCode, Session, auto_meta_template
from .prompt import LMTemplateParser, prompt_images

logger = logging.getLogger('lmwrap')

# Per-call GenerationConfig fields besides lagent's gen params, plus do_preprocess.
_EXTRA_GEN_PARAMS = (
    'do_preprocess', 'do_sample', 'skip_special_tokens', 'ignore_eos', 'random_seed', 'min_new_tokens', 'min_p',
    'bad_words', 'stop_token_ids', 'bad_token_ids', 'logprobs', 'logits_processors', 'include_stop_str_in_output',
    'spaces_between_special_tokens', 'response_format',
)


class LMDeployPipeline(BaseLLM):
    """lagent 0.2.4's ``LMDeployPipeline``, on lmwrap's engine.

    Args:
        path: a HF folder, a ``.gguf`` file, a model alias or HF id already on disk; None is the
            engine's default model.
        model_name: the model's name (``'internlm2-chat-7b'``): picks the engine's chat template (used
            only with ``do_preprocess=True``) and, with ``meta_template='auto'``, the meta template.
        tp: tensor parallelism (the engine supports 1).
        pipeline_cfg: engine options: a dict of ``TurbomindEngineConfig`` (or, failing that,
            ``PytorchEngineConfig``) fields, or a config object. Unknown keys are an error
            (lagent drops them silently).
        **kwargs: ``BaseLLM``'s (``meta_template``, ``max_new_tokens``, ``top_p``, ``top_k``,
            ``temperature``, ``repetition_penalty``, ``stop_words``) and ``do_sample``.

    ``generate`` of a list runs as one batch. By default (``do_preprocess=None``) the prompt is
    sent as built by the meta template: the engine's chat template is not applied. Without
    ``do_sample`` (here or per call), sampling is on when ``top_k > 1 or temperature > 0``.
    ``session_id`` with ``sequence_end=False`` keeps the conversation's KV cache in the engine;
    the next call with ``sequence_start=False`` sends only the new text.
    """

    extra_gen_params = _EXTRA_GEN_PARAMS

    def __init__(self, path: Optional[str] = None, model_name: Optional[str] = None, tp: int = 1,
                 pipeline_cfg=dict(), **kwargs):
        from lmwrap_engine import pipeline
        from lmwrap_engine.model_path import DEFAULT_MODEL

        self.do_sample = kwargs.pop('do_sample', None)
        auto_template = kwargs.get('meta_template') == 'auto'
        if auto_template:  # picked once the engine has resolved the model (path may be None or an alias)
            kwargs['meta_template'] = None
        super().__init__(path=path, **kwargs)
        self.model_name = model_name
        backend_config = _backend_config(pipeline_cfg, tp)
        self.model = pipeline(model_path=path, backend_config=backend_config,
                              chat_template_config=_chat_template_config(model_name), log_level='WARNING')
        if auto_template:
            template_parser = kwargs.get('template_parser', LMTemplateParser)
            try:
                self.template_parser = template_parser(auto_meta_template(model_name, path or DEFAULT_MODEL,
                                                                           self.model.model_dir))
            except Exception:
                self.model.close()
                raise

    def _stream(self, prompt: str, gen_params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        gen_config, do_preprocess = self._request_config(gen_params)
        # session_id None: the engine picks a fresh id. Closing the iterator early stops the request.
        responses = self.model.stream_generate(_engine_prompt(prompt), session_id=session.session_id,
                                        gen_config=gen_config,
                                        sequence_start=session.sequence_start, sequence_end=session.sequence_end,
                                        do_preprocess=do_preprocess)
        try:
            for response in responses:
                _raise_if_failed(response.finish_reason, response.text, response.generate_token_len,
                                 response.input_token_len, gen_config)
                yield Delta(response.text, response.generate_token_len, response.finish_reason)
        finally:
            responses.close()

    def _generate_batch(self, prompts: List[str], gen_params: Dict[str, Any]) -> List[str]:
        gen_config, do_preprocess = self._request_config(gen_params)
        responses = self.model.batch_infer([_engine_prompt(p) for p in prompts], gen_config=gen_config,
                                           do_preprocess=do_preprocess)
        for response in responses:
            _raise_if_failed(response.finish_reason, response.text, response.generate_token_len,
                             response.input_token_len, gen_config)
        return [response.text for response in responses]

    def _request_config(self, gen_params: Dict[str, Any]):
        """The engine's ``GenerationConfig`` for these gen params, and whether to apply its chat template."""
        from lmwrap_engine import GenerationConfig

        params = dict(gen_params)
        do_preprocess = bool(params.pop('do_preprocess', None))  # lagent's None means no
        do_sample = params.pop('do_sample', None)
        if do_sample is None:
            do_sample = self.do_sample
        if do_sample is None:
            do_sample = params['top_k'] > 1 or params['temperature'] > 0
        params.setdefault('skip_special_tokens', False)
        return GenerationConfig(do_sample=do_sample, **params), do_preprocess

    def end_session(self, session_id: int) -> None:
        """Ends a kept session and frees its KV cache."""
        self.model.end_session_nowait(session_id)

    def close(self) -> None:
        """Stops the engine."""
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncLMDeployPipeline(AsyncBaseLLM, LMDeployPipeline):
    """``LMDeployPipeline`` with ``async generate`` / ``chat`` and async-iterator ``stream_generate`` /
    ``stream_chat`` (lagent 0.5's async wrappers), streaming from the engine's asyncio API."""

    async def _astream(self, prompt: str, gen_params: Dict[str, Any], session: Session):
        gen_config, do_preprocess = self._request_config(gen_params)
        outputs = self.model.generate(_engine_prompt(prompt), session.session_id, gen_config, sequence_start=session.sequence_start,
                                  sequence_end=session.sequence_end, do_preprocess=do_preprocess)
        try:
            async for out in outputs:
                _raise_if_failed(out.finish_reason, out.response, out.generate_token_len, out.input_token_len,
                                 gen_config)
                yield Delta(out.response, out.generate_token_len, out.finish_reason)
        finally:
            await outputs.aclose()  # stops the request if it is still running


def _engine_prompt(prompt):
    """The engine's form of a prompt: ``(text, images)`` when the meta template placed images in it."""
    images = prompt_images(prompt)
    return (str(prompt), images) if images else prompt


def _raise_if_failed(reason: Optional[str], text: str, num_generated: int, num_input: int, gen_config) -> None:
    if reason == 'error':
        raise LLMError(f'the engine failed the request: {text or "no reason given"}')
    if reason == 'abort':
        raise LLMError('the request was aborted (its session was stopped)', ModelStatusCode.SESSION_CLOSED)
    # lmdeploy answers a prompt that fills the session with an empty 'length' result; that is an error here.
    if reason == 'length' and num_generated == 0 and gen_config.max_new_tokens != 0:
        raise LLMError(f'the prompt ({num_input} tokens) leaves no room to generate in the session (session_len)',
                       ModelStatusCode.SESSION_OUT_OF_LIMIT)


def _backend_config(pipeline_cfg, tp: int):
    from lmwrap_engine import PytorchEngineConfig, TurbomindEngineConfig

    if isinstance(pipeline_cfg, (TurbomindEngineConfig, PytorchEngineConfig)):
        return dataclasses.replace(pipeline_cfg, tp=tp)
    if not isinstance(pipeline_cfg, dict):
        raise TypeError(f'pipeline_cfg must be a dict or an engine config, got {type(pipeline_cfg).__name__}')
    options = {**pipeline_cfg, 'tp': tp}
    for config_class in (TurbomindEngineConfig, PytorchEngineConfig):
        if set(options) <= {f.name for f in fields(config_class)}:
            return config_class(**options)
    known = {f.name for f in fields(TurbomindEngineConfig)} | {f.name for f in fields(PytorchEngineConfig)}
    raise ValueError(f'unknown pipeline_cfg option(s) {sorted(set(options) - known) or sorted(options)}; '
                     'give TurbomindEngineConfig or PytorchEngineConfig fields')


def _chat_template_config(model_name: Optional[str]):
    """The engine's chat template for ``model_name``, matched as lmdeploy matches model names (lagent
    configs say e.g. ``'internlm2-chat-7b'``); it only matters with ``do_preprocess=True``."""
    from lmwrap_engine import ChatTemplateConfig
    from lmwrap_engine.chat_template import HF_TEMPLATE_NAME, best_match_model, list_chat_template_names

    if not model_name:
        return None
    if model_name in list_chat_template_names() or model_name == HF_TEMPLATE_NAME:
        return ChatTemplateConfig(model_name=model_name)
    matched = best_match_model(model_name)
    if matched:
        return ChatTemplateConfig(model_name=matched)
    logger.warning('model_name %r matches no chat template; the model\'s own is used (with do_preprocess=True)',
                   model_name)
    return None
