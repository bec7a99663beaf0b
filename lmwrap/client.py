"""LMDeployClient: the model runs behind an api_server someone else started (lmdeploy's or ours).

Talks HTTP with ``requests`` only: no torch, no lmwrap_engine import, so a thin install works.
"""
import json
import logging
import time
from typing import Any, Dict, Iterator, List, Optional

import requests

from .base import AsyncBaseLLM, BaseLLM, Delta, LLMError, ModelStatusCode, Session, resolve_meta_template
from .prompt import prompt_images

logger = logging.getLogger('lmwrap')

# Per-call keyword arguments besides lagent's gen params. lagent's LMDeployClient takes
# ignore_eos, skip_special_tokens, timeout (and stream in stream_chat).
_EXTRA_GEN_PARAMS = ('ignore_eos', 'skip_special_tokens', 'timeout', 'stream', 'seed', 'min_new_tokens', 'min_p')
_CONNECT_TIMEOUT = 10.0


class LMDeployClient(BaseLLM):
    """lagent 0.2.4's ``LMDeployClient``: prompts built with the meta template, completed by an
    lmdeploy-compatible api_server through ``POST /v1/completions`` (no server-side chat template).

    Args:
        url: the server's base URL (``http://127.0.0.1:23333``).
        model_name: a model id the server serves; None takes the one it serves (an error if it
            serves several). An id it does not serve is an ``LLMError`` naming the served ones.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        timeout: HTTP read timeout in seconds (the longest wait for the next streamed piece; None
            waits forever); a call may override it with ``timeout=``.
        startup_timeout: how long the first request keeps retrying while the server does not yet
            accept connections (it is starting). Once the server has answered, a refused
            connection fails at once.
        meta_template: role dicts, a template name, or ``'auto'`` (picked from ``model_name``).
        **kwargs: ``BaseLLM``'s (``max_new_tokens``, ``top_p``, ``top_k``, ``temperature``,
            ``repetition_penalty``, ``stop_words``).

    Better than lagent's: requests stream (closing a stream early stops the request on the
    server), stop words are sent to the server (it stops there instead of generating on), errors
    are statuses in ``stream_chat`` and exceptions in ``generate`` (not ``KeyError``/``''``), and
    **kept sessions work**: ``session_id`` with ``sequence_end=False`` keeps the conversation's KV
    cache on the server and a later call with ``sequence_start=False`` sends only the new text.
    They travel as ``session_id`` / ``sequence_start`` / ``sequence_end`` fields of
    ``/v1/completions`` (an lmwrap api_server extension; lmdeploy's server ignores them). Whether
    the server really continued is checked from the reply's usage (the session's history tokens),
    so a server that cannot keep sessions gives an ``LLMError`` instead of a wrong answer.
    """

    extra_gen_params = _EXTRA_GEN_PARAMS

    def __init__(self, url: str, model_name: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: Optional[float] = None, startup_timeout: float = 60.0, **kwargs):
        if not isinstance(url, str) or not url.startswith(('http://', 'https://')):
            raise ValueError(f'url must be an http(s) URL such as "http://127.0.0.1:23333", got {url!r}')
        self.url = url.rstrip('/')
        self.api_key = api_key
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.headers = {'content-type': 'application/json'}
        if api_key is not None:
            self.headers['Authorization'] = f'Bearer {api_key}'
        self.http = requests.Session()
        self._is_connected = False
        self._checked_model = False
        auto_template = kwargs.get('meta_template') == 'auto'
        if auto_template:
            kwargs['meta_template'] = None
        super().__init__(path=url, **kwargs)
        self.model_name = model_name
        if auto_template:  # needs a name to pick from: ask the server when none is given
            name = model_name or self._served_model()
            self.template_parser = kwargs.get('template_parser', type(self.template_parser))(
                resolve_meta_template('auto', name))

    # -- the adapter primitive --------------------------------------------------------------------

    def _stream(self, prompt: str, gen_params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        body = self._request_body(prompt, gen_params, session, stream=True)
        response = self._post('/v1/completions', body, gen_params.get('timeout', self.timeout), stream=True)
        usage, has_text = None, False
        try:
            for chunk in _sse_chunks(response):
                if chunk.get('usage'):
                    usage = chunk['usage']
                for choice in chunk.get('choices') or ():
                    text, reason = choice.get('text') or '', choice.get('finish_reason')
                    has_text = has_text or bool(text)
                    if reason:
                        self._check_finish(reason, has_text, gen_params)
                    if text or reason:
                        yield Delta(text, None, reason)
            if usage is not None:
                self._check_usage(usage, session)
        finally:
            response.close()  # a stream closed early drops the connection: the server stops the request

    def _generate_batch(self, prompts: List[str], gen_params: Dict[str, Any]) -> List[str]:
        if any(prompt_images(p) for p in prompts):  # images travel per request: one request per prompt
            return [self._complete(p, gen_params, Session()) for p in prompts]
        body = self._request_body(prompts, gen_params, Session(), stream=False)
        response = self._post('/v1/completions', body, gen_params.get('timeout', self.timeout), stream=False)
        with response:
            reply = _json(response)
        choices = sorted(reply.get('choices') or (), key=lambda choice: choice.get('index', 0))
        if len(choices) != len(prompts):
            raise LLMError(f'the server answered {len(choices)} choices for {len(prompts)} prompts: {reply}')
        for choice in choices:
            self._check_finish(choice.get('finish_reason'), bool(choice.get('text')), gen_params)
        return [choice.get('text', '') for choice in choices]

    # -- OpenAI chat with tools --------------------------------------------------------------------

    def chat_completion(self, messages: List[dict], tools: Optional[List[dict]] = None, tool_choice=None,
                        parallel_tool_calls: Optional[bool] = None, response_format: Optional[dict] = None,
                        **gen_params) -> Dict[str, Any]:
        """One reply to OpenAI ``messages`` through ``POST /v1/chat/completions`` (the server's chat template,
        not the meta template), passing ``tools`` / ``tool_choice`` (``'auto'``, ``'none'``,
        ``'required'`` or ``{"type": "function", "function": {"name": ...}}``) / ``parallel_tool_calls`` /
        ``response_format`` through. Returns the reply message (``role``, ``content``, ``tool_calls``:
        OpenAI's, with ``function.arguments`` a JSON string, or None) with its ``finish_reason``
        (``'tool_calls'`` when it calls tools). Feed tool results back as ``{"role": "tool",
        "tool_call_id": ..., "content": ...}`` messages after the assistant message."""
        params = self._gen_params(gen_params)
        body = dict(model=self._model(), messages=messages, max_tokens=params['max_new_tokens'],
                    temperature=params['temperature'], top_p=params['top_p'], top_k=params['top_k'],
                    repetition_penalty=params['repetition_penalty'], stop=params['stop_words'] or None,
                    ignore_eos=bool(params.get('ignore_eos', False)), stream=False)
        for name in ('seed', 'min_new_tokens', 'min_p', 'skip_special_tokens'):
            if params.get(name) is not None:
                body[name] = params[name]
        extra = dict(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                     response_format=response_format)
        body.update({k: v for k, v in extra.items() if v is not None})
        response = self._post('/v1/chat/completions', body, params.get('timeout', self.timeout), stream=False)
        with response:
            reply = _json(response)
        choices = reply.get('choices') or ()
        if not choices or not isinstance(choices[0].get('message'), dict):
            raise LLMError(f'the api_server sent a reply without a message: {reply}')
        self._check_finish(choices[0].get('finish_reason'), True, params)
        return {**choices[0]['message'], 'finish_reason': choices[0].get('finish_reason')}

    # -- sessions ---------------------------------------------------------------------------------

    def end_session(self, session_id: int) -> None:
        """Ends a kept session and frees its KV cache on the server."""
        # lmdeploy's way (APIClient.end_session): an empty non-interactive turn. A session the server
        # no longer holds is already ended, so only transport errors matter.
        body = dict(prompt='', session_id=session_id, interactive_mode=False, request_output_len=0, stream=False)
        self._post('/v1/chat/interactive', body, self.timeout, stream=False, check=False).close()

    def close(self) -> None:
        """Closes the HTTP connections."""
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- request building -------------------------------------------------------------------------

    def _request_body(self, prompt, gen_params: Dict[str, Any], session: Session, stream: bool) -> Dict[str, Any]:
        params = dict(gen_params)
        body = dict(model=self._model(), prompt=prompt, max_tokens=params['max_new_tokens'],
                    temperature=params['temperature'], top_p=params['top_p'], top_k=params['top_k'],
                    repetition_penalty=params['repetition_penalty'], stop=params['stop_words'] or None,
                    ignore_eos=bool(params.get('ignore_eos', False)),
                    skip_special_tokens=bool(params.get('skip_special_tokens', False)), stream=stream)
        for name in ('seed', 'min_new_tokens', 'min_p'):
            if params.get(name) is not None:
                body[name] = params[name]
        if stream:
            body['stream_options'] = dict(include_usage=True)
        images = prompt_images(prompt)
        if images:  # an lmwrap api_server extension of /v1/completions: the prompt places them with IMAGE_TOKEN
            body['prompt'] = str(prompt)
            body['image_url'] = [image_url(im) for im in images]
        if session.session_id is not None:
            body['session_id'] = session.session_id
        if not (session.sequence_start and session.sequence_end):
            if session.session_id is None:
                raise ValueError('sequence_start=False / sequence_end=False need a session_id')
            body.update(sequence_start=session.sequence_start, sequence_end=session.sequence_end)
        return body

    def _model(self) -> str:
        if self.model_name is None:
            self.model_name = self._served_model()
        elif not self._checked_model:
            served = self._served_models()
            if self.model_name not in served:
                raise LLMError(f'the server at {self.url} does not serve model {self.model_name!r}; '
                               f'it serves {served}', ModelStatusCode.SESSION_INVALID_ARG)
        self._checked_model = True
        return self.model_name

    def _served_models(self) -> List[str]:
        response = self._get('/v1/models')
        with response:
            return [item['id'] for item in _json(response).get('data', [])]

    def _served_model(self) -> str:
        served = self._served_models()
        if len(served) != 1:
            raise LLMError(f'the server at {self.url} serves {served}: pass model_name= one of them',
                           ModelStatusCode.SESSION_INVALID_ARG)
        return served[0]

    # -- transport --------------------------------------------------------------------------------

    def _get(self, route: str) -> requests.Response:
        return self._send('GET', route, None, self.timeout, stream=False, check=True)

    def _post(self, route: str, body, timeout, stream: bool, check: bool = True) -> requests.Response:
        return self._send('POST', route, body, timeout, stream, check)

    def _send(self, method, route, body, timeout, stream, check) -> requests.Response:
        url = self.url + route
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                response = self.http.request(method, url, json=body, headers=self.headers, stream=stream,
                                             timeout=(_CONNECT_TIMEOUT, timeout))
                break
            except requests.ConnectionError as error:
                # Only a server that has never answered may still be starting; retrying is safe
                # because a refused connection delivered nothing.
                if self._is_connected or time.monotonic() >= deadline or not _is_refused(error):
                    raise LLMError(f'cannot reach the api_server at {self.url}: {error}') from error
                time.sleep(0.5)
            except requests.Timeout as error:
                raise LLMError(f'the api_server at {self.url} did not answer within {timeout} s: {error}') \
                    from error
        self._is_connected = True
        if check and response.status_code >= 400:
            with response:
                raise self._http_error(response, body)
        return response

    def _http_error(self, response: requests.Response, body) -> LLMError:
        message = _error_message(response)
        code = response.status_code
        if code == 404 and isinstance(body, dict) and 'model' in body:
            try:
                served = self._served_models()
            except LLMError:
                served = '(unknown)'
            return LLMError(f'the server at {self.url} does not serve model {body["model"]!r}; it serves {served} '
                            f'(HTTP 404: {message})', ModelStatusCode.SESSION_INVALID_ARG)
        if code == 401:
            return LLMError(f'the api_server at {self.url} refused the API key (HTTP 401: {message})')
        status = ModelStatusCode.SESSION_INVALID_ARG if 400 <= code < 500 else ModelStatusCode.SERVER_ERR
        return LLMError(f'the api_server at {self.url} answered HTTP {code}: {message}', status)

    def _check_finish(self, reason: Optional[str], has_text: bool, gen_params) -> None:
        if reason == 'error':
            raise LLMError('the server failed the request (finish_reason "error")')
        if reason == 'abort':
            raise LLMError('the request was aborted (its session was stopped)', ModelStatusCode.SESSION_CLOSED)
        if reason == 'length' and not has_text and gen_params.get('max_new_tokens'):
            raise LLMError('the prompt leaves no room to generate in the session (session_len)',
                           ModelStatusCode.SESSION_OUT_OF_LIMIT)

    def _check_usage(self, usage: Dict[str, int], session: Session) -> None:
        if session.sequence_start:
            return
        history = usage.get('total_tokens', 0) - usage.get('prompt_tokens', 0) - usage.get('completion_tokens', 0)
        if history <= 0:
            raise LLMError(f'the api_server at {self.url} did not continue session {session.session_id}: it holds '
                           'no history for it (ended, never kept with sequence_end=False, or a server that does '
                           'not keep sessions on /v1/completions)', ModelStatusCode.SESSION_CLOSED)


class AsyncLMDeployClient(AsyncBaseLLM, LMDeployClient):
    """``LMDeployClient`` with ``async generate`` / ``chat`` and async-iterator ``stream_generate`` /
    ``stream_chat`` (lagent 0.5's ``AsyncLMDeployClient``); requests run in worker threads."""

    async def chat_completion(self, messages: List[dict], **kwargs) -> Dict[str, Any]:
        """``LMDeployClient.chat_completion`` in a worker thread."""
        import asyncio
        return await asyncio.to_thread(LMDeployClient.chat_completion, self, messages, **kwargs)


def _sse_chunks(response: requests.Response) -> Iterator[dict]:
    """The JSON objects of a ``data: {...}`` event stream, up to ``data: [DONE]``."""
    for line in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b'\n'):
        line = line.strip()
        if not line or line.startswith(b':'):
            continue
        if line.startswith(b'data:'):
            line = line[5:].strip()
        if line == b'[DONE]':
            return
        try:
            chunk = json.loads(line)
        except ValueError:
            raise LLMError(f'the api_server sent a malformed stream line: {line[:200]!r}') from None
        if not isinstance(chunk, dict):
            raise LLMError(f'the api_server sent an unexpected stream item: {chunk!r}')
        if chunk.get('object') == 'error' or 'error' in chunk:
            error = chunk.get('error', chunk)
            message = error.get('message', error) if isinstance(error, dict) else error
            raise LLMError(f'the api_server failed the request: {message}')
        yield chunk


def _json(response: requests.Response) -> Dict[str, Any]:
    try:
        reply = response.json()
    except ValueError:
        raise LLMError(f'the api_server sent a reply that is not JSON: {response.text[:200]!r}') from None
    if not isinstance(reply, dict):
        raise LLMError(f'the api_server sent an unexpected reply: {reply!r}')
    return reply


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason
    if isinstance(body, dict):
        detail = body.get('detail')
        if isinstance(detail, dict) and isinstance(detail.get('error'), dict):
            return detail['error'].get('message', str(detail))
        if isinstance(body.get('error'), dict):
            return body['error'].get('message', str(body))
        if 'message' in body:
            return str(body['message'])
        if detail is not None:
            return json.dumps(detail)[:500]
    return str(body)[:500]


def _is_refused(error: requests.ConnectionError) -> bool:
    """Whether nothing listened on the port (requests wraps urllib3's wrapping of ConnectionRefusedError)."""
    text = str(error)
    return 'Connection refused' in text or '[Errno 111]' in text


def image_url(image) -> str:
    """An image as a URL the server can load: http(s) and data URLs as they are; a local path or a PIL
    image as a ``data:`` URL (the server may not see this machine's files)."""
    import base64
    import io
    import mimetypes
    import os
    if isinstance(image, str) and image.startswith(('http://', 'https://', 'data:')):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        path = path[len('file://'):] if path.startswith('file://') else path
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f'cannot read image {path!r}: {exc.strerror or exc}') from None
        mime = mimetypes.guess_type(path)[0] or 'image/png'
    elif hasattr(image, 'save'):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format='PNG')
        data, mime = buf.getvalue(), 'image/png'
    else:
        raise TypeError(f'an image must be a URL, a path or a PIL image, got {type(image).__name__}')
    return f'data:{mime};base64,' + base64.b64encode(data).decode()
