"""lmdeploy's ``APIClient`` for ``lmwrap serve api_server`` (and any lmdeploy v0.6 api_server).

Same methods, defaults and results as ``lmdeploy.serve.openai.api_client.APIClient``; code written
for it runs unchanged. Differences, none of which changes what a working call returns:

- one ``requests.Session`` (connection reuse) and an optional HTTP ``timeout`` (constructor, or
  ``timeout=`` per call; lmdeploy has none and posts a ``timeout`` argument to the server);
- extra keyword arguments of a request method are sent as top-level fields (lmdeploy nests them
  in a ``"kwargs"`` object the server ignores), so ``seed=``, ``stream_options=``, ``tools=`` work;
- ``raise_on_error=True`` raises ``APIError`` for an HTTP error instead of yielding the error body.

Imports nothing but ``requests`` (no torch): a thin client install can use it.
"""
import json
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

import requests

logger = logging.getLogger('lmwrap_engine')

DEFAULT_URL = 'http://127.0.0.1:23333'


class APIError(RuntimeError):
    """An HTTP error answer of the server (only with ``raise_on_error=True``)."""

    def __init__(self, status_code: int, body: Any):
        message = body.get('message') if isinstance(body, dict) else None
        if message is None and isinstance(body, dict) and isinstance(body.get('detail'), dict):
            message = body['detail'].get('error', {}).get('message')
        super().__init__(f'HTTP {status_code}: {message or body}')
        self.status_code = status_code
        self.body = body


def json_loads(content):
    """lmdeploy's lenient parser: a line that is not JSON becomes ``''`` (logged)."""
    try:
        return json.loads(content)
    except (TypeError, ValueError):
        logger.warning('weird json content %r', content)
        return ''


def get_model_list(api_url: str, headers: Optional[dict] = None, timeout: Optional[float] = None):
    """The model ids a ``/v1/models`` URL lists."""
    response = requests.get(api_url, headers=headers, timeout=timeout)
    return [item['id'] for item in json_loads(response.text).get('data', [])]


class APIClient:
    """A client of an lmdeploy-compatible api_server.

    Args:
        api_server_url: the server's base URL.
        api_key: sent as ``Authorization: Bearer <api_key>``.
        timeout: HTTP timeout in seconds (connect and between reads) for every call; None waits forever.
        raise_on_error: raise ``APIError`` on an HTTP error instead of yielding the server's error JSON.
    """

    def __init__(self, api_server_url: str = DEFAULT_URL, api_key: Optional[str] = None,
                 timeout: Optional[float] = None, raise_on_error: bool = False, **kwargs):
        api_server_url = api_server_url.rstrip('/')
        self.api_server_url = api_server_url
        self.chat_intractive_v1_url = f'{api_server_url}/v1/chat/interactive'  # lmdeploy's spelling
        self.chat_interactive_v1_url = self.chat_intractive_v1_url
        self.chat_completions_v1_url = f'{api_server_url}/v1/chat/completions'
        self.completions_v1_url = f'{api_server_url}/v1/completions'
        self.models_v1_url = f'{api_server_url}/v1/models'
        self.encode_v1_url = f'{api_server_url}/v1/encode'
        self._available_models = None
        self.api_key = api_key
        self.timeout = timeout
        self.raise_on_error = raise_on_error
        self.headers = {'content-type': 'application/json'}
        if api_key is not None:
            self.headers['Authorization'] = f'Bearer {api_key}'
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def available_models(self) -> Optional[List[str]]:
        """The served model ids (asked once, then cached)."""
        if self._available_models is not None:
            return self._available_models
        response = self.session.get(self.models_v1_url, headers=self.headers, timeout=self.timeout)
        self._check(response)
        models = json_loads(response.text)
        if not isinstance(models, dict):
            return None
        self._available_models = [item['id'] for item in models.get('data', [])]
        return self._available_models

    def encode(self, input, do_preprocess: bool = False, add_bos: bool = True) -> Tuple[Any, Any]:
        """Token ids of ``input`` (a str or a list of str): ``(input_ids, length)``."""
        response = self.session.post(self.encode_v1_url, headers=self.headers, timeout=self.timeout,
                                     json=dict(input=input, do_preprocess=do_preprocess, add_bos=add_bos))
        self._check(response)
        output = json_loads(response.text)
        if not isinstance(output, dict) or 'input_ids' not in output:
            return None, None
        return output['input_ids'], output['length']

    def chat_completions_v1(self, model: str, messages, temperature: float = 0.7, top_p: float = 1.0,
                            logprobs: bool = False, top_logprobs: int = 0, n: int = 1,
                            max_tokens: Optional[int] = None, stop=None, stream: bool = False,
                            presence_penalty: float = 0.0, frequency_penalty: float = 0.0, user=None,
                            repetition_penalty: float = 1.0, session_id: int = -1, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, **kwargs) -> Iterator[dict]:
        """``POST /v1/chat/completions``: yields the reply (``stream=False``) or each SSE chunk."""
        payload = dict(model=model, messages=messages, temperature=temperature, top_p=top_p, logprobs=logprobs,
                       top_logprobs=top_logprobs, n=n, max_tokens=max_tokens, stop=stop, stream=stream,
                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, user=user,
                       repetition_penalty=repetition_penalty, session_id=session_id, ignore_eos=ignore_eos,
                       skip_special_tokens=skip_special_tokens)
        return self._post(self.chat_completions_v1_url, payload, kwargs, sse=stream)

    def completions_v1(self, model: str, prompt, suffix: Optional[str] = None, temperature: float = 0.7,
                       n: int = 1, max_tokens: int = 16, stream: bool = False, stop=None, top_p: float = 1.0,
                       top_k: int = 40, user=None, repetition_penalty: float = 1.0, session_id: int = -1,
                       ignore_eos: bool = False, skip_special_tokens: bool = True, **kwargs) -> Iterator[dict]:
        """``POST /v1/completions`` (no chat template): yields the reply or each SSE chunk."""
        payload = dict(model=model, prompt=prompt, suffix=suffix, temperature=temperature, n=n,
                       max_tokens=max_tokens, stream=stream, stop=stop, top_p=top_p, top_k=top_k, user=user,
                       repetition_penalty=repetition_penalty, session_id=session_id, ignore_eos=ignore_eos,
                       skip_special_tokens=skip_special_tokens)
        return self._post(self.completions_v1_url, payload, kwargs, sse=stream)

    def chat_interactive_v1(self, prompt, image_url=None, session_id: int = -1, interactive_mode: bool = False,
                            stream: bool = False, stop=None, request_output_len: Optional[int] = None,
                            top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8,
                            repetition_penalty: float = 1.0, ignore_eos: bool = False,
                            skip_special_tokens: bool = True, adapter_name: Optional[str] = None,
                            **kwargs) -> Iterator[dict]:
        """``POST /v1/chat/interactive``: ``interactive_mode=True`` keeps the session's history (KV
        cache) on the server for the next call with the same ``session_id``. Yields
        ``{text, tokens, input_tokens, history_tokens, finish_reason}`` items."""
        payload = dict(prompt=prompt, image_url=image_url, session_id=session_id,
                       interactive_mode=interactive_mode, stream=stream, stop=stop,
                       request_output_len=request_output_len, top_p=top_p, top_k=top_k, temperature=temperature,
                       repetition_penalty=repetition_penalty, ignore_eos=ignore_eos,
                       skip_special_tokens=skip_special_tokens, adapter_name=adapter_name)
        return self._post(self.chat_interactive_v1_url, payload, kwargs, sse=False)

    def chat(self, prompt, session_id: int, image_url=None, request_output_len: int = 512, stream: bool = False,
             top_p: float = 0.8, top_k: int = 40, temperature: float = 0.8, repetition_penalty: float = 1.0,
             ignore_eos: bool = False) -> Iterator[Tuple[str, int, Optional[str]]]:
        """One turn of an interactive session: yields ``(text, tokens, finish_reason)``."""
        if session_id == -1:  # lmdeploy asserts this
            raise ValueError('chat needs a session_id other than -1 (the session to keep)')
        if image_url is not None and not isinstance(image_url, str):
            raise TypeError(f'image_url must be a str, got {type(image_url).__name__}')
        for outputs in self.chat_interactive_v1(prompt, image_url=image_url, session_id=session_id,
                                                request_output_len=request_output_len, interactive_mode=True,
                                                stream=stream, top_k=top_k, top_p=top_p, temperature=temperature,
                                                repetition_penalty=repetition_penalty, ignore_eos=ignore_eos):
            if outputs.get('finish_reason') == 'length' and outputs.get('tokens') == 0:
                logger.warning('the session is full (session_len): end it with end_session(%s)', session_id)
            yield outputs['text'], outputs['tokens'], outputs['finish_reason']

    def end_session(self, session_id: int) -> None:
        """Ends an interactive session and frees its history on the server."""
        for _ in self.chat_interactive_v1(prompt='', session_id=session_id, interactive_mode=False,
                                          request_output_len=0):
            pass

    # -- transport --------------------------------------------------------------------------------

    def _post(self, url: str, payload: Dict[str, Any], extra: Dict[str, Any], sse: bool) -> Iterator[dict]:
        timeout = extra.pop('timeout', self.timeout)
        payload.update(extra)
        # Requests go out when iterated, as lmdeploy's generators do.
        return self._lines(url, payload, timeout, sse)

    def _lines(self, url, payload, timeout, sse) -> Iterator[dict]:
        with self.session.post(url, headers=self.headers, json=payload, stream=bool(payload.get('stream')),
                               timeout=timeout) as response:
            self._check(response)
            for chunk in response.iter_lines(chunk_size=8192, decode_unicode=False, delimiter=b'\n'):
                if not chunk:
                    continue
                decoded = chunk.decode('utf-8')
                if sse:
                    if decoded.strip() == 'data: [DONE]':
                        continue
                    if decoded[:6] == 'data: ':
                        decoded = decoded[6:]
                yield json_loads(decoded)

    def _check(self, response) -> None:
        if self.raise_on_error and response.status_code >= 400:
            raise APIError(response.status_code, json_loads(response.text) or response.text)


def client(api_server_url: str = DEFAULT_URL, api_key: Optional[str] = None, **kwargs) -> APIClient:
    """lmdeploy's ``client(...)``: an ``APIClient`` of the server at ``api_server_url``."""
    return APIClient(api_server_url, api_key, **kwargs)
