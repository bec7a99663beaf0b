"""The interface every adapter shares: lagent 0.2.4's ``BaseModel`` over one streaming primitive."""
import asyncio
import logging
import threading
from copy import copy
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional, Tuple, Union

from .prompt import LMTemplateParser, held_back_len, trim_stop_words

logger = logging.getLogger('lmwrap')


class ModelStatusCode(IntEnum):
    """lagent's ``ModelStatusCode``: same names and values.

    A separate class (importing lagent pulls in all of its agents and tools), but an
    ``IntEnum``, so it compares, hashes and maps exactly like lagent's: agents do
    ``state == lagent.schema.ModelStatusCode.END``, ``state.value < 0`` and
    ``getattr(AgentStatusCode, state.name)``.
    """

    END = 0  # last item of a stream
    STREAM_ING = 1
    SERVER_ERR = -1
    SESSION_CLOSED = -2
    SESSION_OUT_OF_LIMIT = -3
    SESSION_INVALID_ARG = -4
    SESSION_READY = 2


class LLMError(RuntimeError):
    """A request the model accepted but could not complete; ``status`` is the matching negative code."""

    def __init__(self, message: str, status: ModelStatusCode = ModelStatusCode.SERVER_ERR):
        super().__init__(message)
        self.status = status


@dataclass
class Delta:
    """One step of an adapter's stream: the new text and, when known, the tokens generated so far."""

    text: str
    num_tokens: Optional[int] = None
    finish_reason: Optional[str] = None  # on the last delta: 'stop' | 'length' (errors are raised)


@dataclass(frozen=True)
class Session:
    """Where a request runs: a fresh one-off session (``session_id=None``) or a kept conversation.

    ``sequence_start=False`` continues the KV cache the session holds (send only the new text);
    ``sequence_end=False`` keeps it for the next call.
    """

    session_id: Optional[int] = None
    sequence_start: bool = True
    sequence_end: bool = True

    @property
    def is_fresh(self) -> bool:
        return self.session_id is None and self.sequence_start and self.sequence_end


StreamItem = Tuple[ModelStatusCode, str, Optional[int]]


class BaseLLM:
    """lagent's ``BaseModel`` (same constructor, ``gen_params``, ``generate``/``chat``/``stream_chat``).

    An adapter implements one primitive, ``_stream(prompt, gen_params, session)``: a generator of
    ``Delta``s that raises on failure (``LLMError`` with its status) and stops its request when
    closed early. It may override ``_generate_batch`` to batch lists and ``_status_for`` to map
    its own errors to statuses.
    Everything else (prompt building, per-call gen params, stop-word trimming, statuses) lives here.

    Every call takes ``session_id`` / ``sequence_start`` / ``sequence_end`` and any gen param
    as keyword overrides. ``meta_template`` may be a list of role dicts, a name from
    ``meta_templates.META_TEMPLATES``, or ``'auto'`` (picked from ``path``).
    """

    is_api: bool = False
    #: Per-call keyword arguments an adapter accepts besides lagent's gen params.
    extra_gen_params: Tuple[str, ...] = ()
    #: Whether ``stream_chat`` puts the generated-token count third (lagent's TritonClient does;
    #: its LMDeploy wrappers put None).
    reports_num_tokens: bool = False

    def __init__(self,
                 path: Optional[str],
                 tokenizer_only: bool = False,
                 template_parser=LMTemplateParser,
                 meta_template: Union[None, str, List[dict]] = None,
                 *,
                 max_new_tokens: int = 512,
                 top_p: float = 0.8,
                 top_k: int = 40,
                 temperature: float = 0.8,
                 repetition_penalty: float = 1.0,
                 stop_words: Union[None, str, List[str]] = None):
        self.path = path
        self.tokenizer_only = tokenizer_only
        self.template_parser = template_parser(resolve_meta_template(meta_template, path))
        self.eos_token_id = None
        self.gen_params = dict(max_new_tokens=max_new_tokens, top_p=top_p, top_k=top_k, temperature=temperature,
                               repetition_penalty=repetition_penalty, stop_words=_stop_word_list(stop_words))

    # -- the primitive adapters implement --------------------------------------------------------

    def _stream(self, prompt: str, gen_params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        raise NotImplementedError

    def _generate_batch(self, prompts: List[str], gen_params: Dict[str, Any]) -> List[str]:
        """Completions of several one-off prompts; adapters that can batch override this."""
        return [self._complete(prompt, gen_params, Session()) for prompt in prompts]

    def _status_for(self, error: Exception) -> ModelStatusCode:
        """The negative status ``stream_chat`` reports for ``error``."""
        if isinstance(error, LLMError):
            return error.status
        if isinstance(error, (ValueError, TypeError)):
            return ModelStatusCode.SESSION_INVALID_ARG
        return ModelStatusCode.SERVER_ERR

    # -- lagent's interface -----------------------------------------------------------------------

    def update_gen_params(self, **kwargs) -> Dict[str, Any]:
        gen_params = copy(self.gen_params)
        gen_params.update(kwargs)
        return gen_params

    def generate(self, inputs: Union[str, List[str]], session_id: Optional[int] = None,
                 sequence_start: bool = True, sequence_end: bool = True, **gen_params) -> Union[str, List[str]]:
        """Completion of a prompt (str -> str) or of each prompt of a list (list -> list, batched).

        Failures raise (``LLMError`` or the backend's ``ValueError``); nothing fails silently.
        """
        prompts, params, session = self._prepare(inputs, session_id, sequence_start, sequence_end, gen_params)
        if isinstance(inputs, str):
            texts = [self._complete(prompts[0], params, session)]
        else:
            texts = self._generate_batch(prompts, params)
        texts = self._trim(texts, params)
        return texts[0] if isinstance(inputs, str) else texts

    def stream_generate(self, inputs: str, session_id: Optional[int] = None, sequence_start: bool = True,
                        sequence_end: bool = True, **gen_params) -> Iterator[StreamItem]:
        """Streams a prompt's completion as ``(ModelStatusCode, text_so_far, n_tokens | None)``.

        ``STREAM_ING`` items carry the text so far (never half a stop word), the last item is
        ``END`` with the final text. A failed request ends the stream with a negative status
        (logged with its reason); a malformed call raises ``TypeError``/``ValueError``.
        """
        params, session = self._prepare_stream(inputs, session_id, sequence_start, sequence_end, gen_params)
        return self._stream_items(inputs, params, session)

    def chat(self, inputs: Union[List[dict], List[List[dict]]], **gen_params) -> Union[str, List[str]]:
        """Reply to a dialog (list of messages -> str) or to each of several (list of dialogs -> list)."""
        return self.generate(self._parse_dialogs(inputs), **gen_params)

    def stream_chat(self, inputs: List[dict], session_id: Optional[int] = None, sequence_start: bool = True,
                    sequence_end: bool = True, **gen_params) -> Iterator[StreamItem]:
        """``stream_generate`` on the prompt the meta template builds from ``inputs``."""
        prompt = self._one_dialog(inputs)
        params, session = self._prepare_stream(prompt, session_id, sequence_start, sequence_end, gen_params)
        return self._stream_items(prompt, params, session)

    def generate_from_template(self, inputs, **gen_params):
        return self.chat(inputs, **gen_params)

    def tokenize(self, prompts):
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------------

    def _parse_dialogs(self, inputs) -> Union[str, List[str]]:
        if not isinstance(inputs, list):
            raise TypeError(f'chat takes a list of messages (or a list of such lists), got {type(inputs).__name__}')
        if not inputs:
            raise ValueError('chat got an empty dialog')
        if isinstance(inputs[0], list):
            return [self.template_parser(dialog) for dialog in inputs]
        return self.template_parser(inputs)

    def _one_dialog(self, inputs) -> str:
        prompt = self._parse_dialogs(inputs)
        if not isinstance(prompt, str):
            raise TypeError('stream_chat takes one dialog (a list of messages), not a list of dialogs')
        return prompt

    def _prepare(self, inputs, session_id, sequence_start, sequence_end, gen_params):
        prompts = _check_prompts(inputs)
        params = self._gen_params(gen_params)
        session = Session(session_id, sequence_start, sequence_end)
        if not isinstance(inputs, str) and not session.is_fresh:
            raise ValueError('session_id / sequence_start / sequence_end hold one conversation: '
                             'pass one prompt (a str)')
        return prompts, params, session

    def _prepare_stream(self, prompt, session_id, sequence_start, sequence_end, gen_params):
        if not isinstance(prompt, str):
            raise TypeError(f'a stream takes one prompt (a str), got {type(prompt).__name__}')
        _, params, session = self._prepare(prompt, session_id, sequence_start, sequence_end, gen_params)
        return params, session

    def _gen_params(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        unknown = set(overrides) - set(self.gen_params) - set(self.extra_gen_params)
        if unknown:
            raise TypeError(f'{type(self).__name__} got unknown generation parameter(s) {sorted(unknown)}; '
                            f'it accepts {sorted(set(self.gen_params) | set(self.extra_gen_params))}')
        params = self.update_gen_params(**overrides)
        params['stop_words'] = _stop_word_list(params.get('stop_words'))
        return params

    def _trim(self, texts: List[str], params: Dict[str, Any]) -> List[str]:
        if params.get('include_stop_str_in_output'):
            return texts
        return trim_stop_words(texts, params['stop_words'])

    def _complete(self, prompt: str, params: Dict[str, Any], session: Session) -> str:
        shown = _StreamText(params, False)
        stream = self._stream(prompt, params, session)
        try:
            for delta in stream:
                shown.add(delta)
                if shown.is_stopped:  # a backend that does not stop at stop words is stopped here
                    break
        finally:
            stream.close()
        return shown.text

    def _stream_items(self, prompt: str, params: Dict[str, Any], session: Session) -> Iterator[StreamItem]:
        shown = _StreamText(params, self.reports_num_tokens)
        stream = self._stream(prompt, params, session)
        try:
            for delta in stream:
                item = shown.add(delta)
                if item:
                    yield item
                if shown.is_stopped:
                    break
        except Exception as error:  # a failed request ends the stream with its status, as lagent's wrappers do
            yield self._failed(shown, error)
            return
        finally:
            stream.close()
        yield shown.end()

    def _failed(self, shown: '_StreamText', error: Exception) -> StreamItem:
        status = self._status_for(error)
        logger.error('%s request failed (%s): %s', type(self).__name__, status.name, error)
        return shown.fail(status)


class _StreamText:
    """What a stream shows: the text so far, cut at a stop word, never ending in half of one."""

    def __init__(self, params: Dict[str, Any], reports_num_tokens: bool):
        self.stop_words = [] if params.get('include_stop_str_in_output') else params['stop_words']
        self.reports_num_tokens = reports_num_tokens
        self.text = self.shown = ''
        self.num_tokens: Optional[int] = None
        self.is_stopped = False

    def add(self, delta: Delta) -> Optional[StreamItem]:
        self.text += delta.text
        if self.reports_num_tokens:
            self.num_tokens = delta.num_tokens
        trimmed = trim_stop_words(self.text, self.stop_words)
        if trimmed != self.text:  # a stop word came through: the answer is complete
            self.text, self.is_stopped = trimmed, True
            return None
        visible = self.text[:len(self.text) - held_back_len(self.text, self.stop_words)]
        if visible == self.shown:
            return None
        self.shown = visible
        return ModelStatusCode.STREAM_ING, visible, self.num_tokens

    def end(self) -> StreamItem:
        return ModelStatusCode.END, self.text, self.num_tokens

    def fail(self, status: ModelStatusCode) -> StreamItem:
        return status, self.shown, self.num_tokens


class AsyncBaseLLM:
    """Async ``generate`` / ``chat`` and async-iterator ``stream_generate`` / ``stream_chat`` (lagent 0.5).

    Mix in before the adapter: ``class AsyncX(AsyncBaseLLM, X)``. Same arguments, results and
    errors as the sync methods (a malformed stream call raises at once, before ``async for``);
    closing a stream early (``aclose``) stops its request. The async primitives default to the
    sync ones run in a worker thread; an adapter with a native async backend overrides
    ``_astream`` (and may override ``_agenerate_batch``).
    """

    async def _astream(self, prompt: str, gen_params: Dict[str, Any], session: Session) -> AsyncIterator[Delta]:
        deltas = _iterate_in_thread(lambda: self._stream(prompt, gen_params, session))
        try:
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()

    async def _agenerate_batch(self, prompts: List[str], gen_params: Dict[str, Any]) -> List[str]:
        return await asyncio.to_thread(self._generate_batch, prompts, gen_params)

    async def generate(self, inputs: Union[str, List[str]], session_id: Optional[int] = None,
                       sequence_start: bool = True, sequence_end: bool = True, **gen_params):
        prompts, params, session = self._prepare(inputs, session_id, sequence_start, sequence_end, gen_params)
        if isinstance(inputs, str):
            texts = [await self._acomplete(prompts[0], params, session)]
        else:
            texts = await self._agenerate_batch(prompts, params)
        texts = self._trim(texts, params)
        return texts[0] if isinstance(inputs, str) else texts

    def stream_generate(self, inputs: str, session_id: Optional[int] = None, sequence_start: bool = True,
                        sequence_end: bool = True, **gen_params) -> AsyncIterator[StreamItem]:
        params, session = self._prepare_stream(inputs, session_id, sequence_start, sequence_end, gen_params)
        return self._astream_items(inputs, params, session)

    async def chat(self, inputs, **gen_params):
        return await self.generate(self._parse_dialogs(inputs), **gen_params)

    def stream_chat(self, inputs: List[dict], session_id: Optional[int] = None, sequence_start: bool = True,
                    sequence_end: bool = True, **gen_params) -> AsyncIterator[StreamItem]:
        prompt = self._one_dialog(inputs)
        params, session = self._prepare_stream(prompt, session_id, sequence_start, sequence_end, gen_params)
        return self._astream_items(prompt, params, session)

    async def _acomplete(self, prompt: str, params: Dict[str, Any], session: Session) -> str:
        shown = _StreamText(params, False)
        stream = self._astream(prompt, params, session)
        try:
            async for delta in stream:
                shown.add(delta)
                if shown.is_stopped:
                    break
        finally:
            await stream.aclose()
        return shown.text

    async def _astream_items(self, prompt: str, params: Dict[str, Any], session: Session):
        shown = _StreamText(params, self.reports_num_tokens)
        stream = self._astream(prompt, params, session)
        try:
            async for delta in stream:
                item = shown.add(delta)
                if item:
                    yield item
                if shown.is_stopped:
                    break
        except Exception as error:
            yield self._failed(shown, error)
            return
        finally:
            await stream.aclose()
        yield shown.end()


async def _iterate_in_thread(make_iterator) -> AsyncIterator:
    """Runs a blocking iterator in a worker thread that owns it; stopping early closes it there."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    end = object()

    def put(item, error=None):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            stop.set()

    def work():
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    put(item)
                    if stop.is_set():
                        break
            finally:
                close = getattr(iterator, 'close', None)
                if close is not None:
                    close()
        except BaseException as error:  # handed to the consumer
            put(end, error)
        else:
            put(end)

    loop.run_in_executor(None, work)
    try:
        while True:
            item, error = await queue.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def resolve_meta_template(meta_template: Union[None, str, List[dict]], model: Optional[str]) -> Optional[List[dict]]:
    """A meta template given as role dicts, a registered name, or ``'auto'`` (picked from ``model``)."""
    if meta_template is None or isinstance(meta_template, list):
        return meta_template
    if not isinstance(meta_template, str):
        raise TypeError(f'meta_template must be a list of role dicts, a template name or "auto", '
                        f'got {type(meta_template).__name__}')
    from meta_templates import get_meta_template, pick_meta_template
    if meta_template == 'auto':
        if not model:
            raise ValueError('meta_template="auto" needs a model name or path to pick from')
        return pick_meta_template(model)
    return get_meta_template(meta_template)


def auto_meta_template(*hints: Optional[str]) -> List[dict]:
    """``meta_template='auto'`` for an adapter: the template of the first hint (a model name, a path, a
    resolved folder) that names a known one."""
    from meta_templates import get_meta_template, meta_template_name_for

    candidates = [hint for hint in hints if hint]
    for candidate in candidates:
        name = meta_template_name_for(candidate)
        if name:
            return get_meta_template(name)
    raise ValueError(f'meta_template="auto" cannot tell the template of {candidates}; '
                     'pass meta_template= a template name or a list of role dicts')


def _stop_word_list(stop_words) -> Optional[List[str]]:
    if stop_words is None:
        return None
    if isinstance(stop_words, str):
        stop_words = [stop_words]
    if not isinstance(stop_words, (list, tuple)) or not all(isinstance(w, str) and w for w in stop_words):
        raise TypeError(f'stop_words must be a str or a list of non-empty str, got {stop_words!r}')
    return list(stop_words)


def _check_prompts(inputs) -> List[str]:
    prompts = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f'a prompt must be a str or a list of str, got {_describe(inputs)}')
    if not prompts:
        raise ValueError('got an empty list of prompts')
    if not all(prompts):
        raise ValueError('got an empty prompt')
    return prompts


def _describe(value) -> str:
    if isinstance(value, list):
        return 'a list holding ' + ', '.join(sorted({type(v).__name__ for v in value}))
    return type(value).__name__
