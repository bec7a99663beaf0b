"""TritonClient: the model runs behind a Triton Inference Server (``lmwrap serve triton``, or any
server speaking lmdeploy's TurboMind protocol or Triton's LLM text-model convention).

Talks gRPC with ``tritonclient`` and ``numpy`` only: no torch, no lmwrap_engine import. The
protocol (model names, tensors, dtypes) is ``lmwrap_engine.serve.triton.protocol``, which imports
nothing heavy either.
"""
import json
import logging
import queue
import random
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from lmwrap_engine.serve.triton import protocol as P

from .base import BaseLLM, Delta, LLMError, ModelStatusCode, Session, resolve_meta_template
from .prompt import prompt_images

logger = logging.getLogger('lmwrap')

_EXTRA_GEN_PARAMS = ('request_id', 'skip_special_tokens', 'ignore_eos', 'timeout', 'seed')
_END = object()  # the queue's end-of-request marker


class TritonClient(BaseLLM):
    """lagent 0.2.4's ``TritonClient``: prompts built with the meta template, completed by a Triton
    Inference Server over gRPC.

    Args:
        tritonserver_addr: the server's gRPC address, ``'127.0.0.1:33337'``.
        model_name: with ``protocol='turbomind'``, the chat-template name lagent's client takes
            (used only to pick ``meta_template='auto'``); with ``protocol='text'``, the Triton model
            to call.
        session_len: the longest session (prompt + history + reply) this client asks for; a turn
            that would pass it ends with ``SESSION_OUT_OF_LIMIT`` before anything is sent.
        log_level: accepted for lagent's signature (lmwrap logs through the ``lmwrap`` logger).
        protocol: ``'turbomind'``: lmdeploy's ``preprocessing`` / ``turbomind`` / ``postprocessing``
            models (sessions, cancel, token counts); ``'text'``: one model in Triton's LLM
            convention (``text_input`` / ``sampling_parameters`` / ``text_output``, as vLLM's and
            TensorRT-LLM's Triton backends serve), one-off requests only.
        timeout: seconds to wait for the server's next response (None waits forever); a call may
            override it with ``timeout=``.
        meta_template: role dicts, a template name, or ``'auto'`` (picked from ``model_name``).
        **kwargs: ``BaseLLM``'s (``max_new_tokens``, ``top_p``, ``top_k``, ``temperature``,
            ``repetition_penalty``, ``stop_words``).

    Sessions (turbomind protocol): ``session_id`` with ``sequence_end=False`` keeps the
    conversation's KV cache on the server; the next call with ``sequence_start=False`` sends only
    the new text and the server prefills only it. ``end_session`` frees it, ``stop_session``
    cancels a running turn. Closing a stream early cancels its request on the server. Stop words of
    one token stop on the server; longer ones are cut here, and the request is cancelled there.
    Errors are negative statuses in ``stream_chat`` and ``LLMError`` in ``generate``.
    """

    extra_gen_params = _EXTRA_GEN_PARAMS
    reports_num_tokens = True

    def __init__(self, tritonserver_addr: str, model_name: str = '', session_len: int = 32768,
                 log_level: str = 'WARNING', protocol: str = 'turbomind', timeout: Optional[float] = None,
                 **kwargs):
        if protocol not in ('turbomind', 'text'):
            raise ValueError(f"protocol must be 'turbomind' or 'text', got {protocol!r}")
        if not isinstance(tritonserver_addr, str) or '://' in tritonserver_addr or ':' not in tritonserver_addr:
            raise ValueError(f'tritonserver_addr must be a gRPC "host:port", got {tritonserver_addr!r}')
        if protocol == 'text' and not model_name:
            raise ValueError("protocol='text' needs model_name= the Triton model to call")
        import tritonclient.grpc as grpcclient  # imported here: `import lmwrap` must not need it
        self._grpc = grpcclient
        self.log_level = log_level  # lagent's argument; lmwrap logs through the 'lmwrap' logger
        auto_template = kwargs.get('meta_template') == 'auto'
        if auto_template:
            kwargs['meta_template'] = None
        super().__init__(path=None, **kwargs)
        if auto_template:
            self.template_parser = type(self.template_parser)(resolve_meta_template('auto', model_name or None))
        self.tritonserver_addr = tritonserver_addr
        self.model_name = model_name
        self.session_len = session_len
        self.protocol = protocol
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(tritonserver_addr)
        self._ready_models = set()
        self._stop_ids: Dict[str, Optional[int]] = {}
        self._bos_eos: Optional[Tuple[int, int]] = None
        #: Tokens each kept session holds on the server (what the next turn's ``step`` is).
        self._session_tokens: Dict[int, int] = {}
        self._lock = threading.Lock()

    # -- the adapter primitive --------------------------------------------------------------------

    def _stream(self, prompt: str, gen_params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        if prompt_images(prompt):  # never dropped silently
            raise LLMError('TritonClient cannot send images: the Triton protocols carry text only; use '
                           'LMDeployClient, LMDeployServer or LMDeployPipeline for image messages',
                           ModelStatusCode.SESSION_INVALID_ARG)
        if self.protocol == 'text':
            yield from self._stream_text(prompt, gen_params, session)
        else:
            yield from self._stream_turbomind(prompt, gen_params, session)

    def _stream_turbomind(self, prompt: str, params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        import numpy as np
        self._require(P.PREPROCESSING, P.TURBOMIND, P.POSTPROCESSING)
        session_id = session.session_id if session.session_id is not None else random.getrandbits(62)
        start, end = session.sequence_start, session.sequence_end
        bos, eos = self._special_ids()
        ids = self._encode(prompt)
        if not start and ids and ids[0] == bos:
            ids = ids[1:]
        step = 0 if start else self._session_tokens.get(session_id, 0)
        max_new = int(params['max_new_tokens'])
        if len(ids) + max_new + step > self.session_len:
            raise LLMError(f'session {session_id}: {len(ids)} input + {step} history + {max_new} new tokens '
                           f'pass session_len={self.session_len}', ModelStatusCode.SESSION_OUT_OF_LIMIT)
        stop_ids = [i for i in (self._stop_id(word) for word in params['stop_words'] or []) if i is not None]
        inputs = self._turbomind_inputs(np, ids, max_new, step, params, stop_ids, eos, session_id, start, end)
        responses = self._start(P.TURBOMIND, inputs, params)
        finished, generated, text, reason = False, [], '', None
        try:
            for result in responses:
                if result is _END:
                    finished = True
                    break
                output_ids = result.as_numpy('output_ids').reshape(-1)
                length = int(result.as_numpy('sequence_length').reshape(-1)[0])
                generated = [int(t) for t in output_ids[len(ids) + step:length]]
                stopped = bool(generated) and (generated[-1] == eos or generated[-1] in stop_ids)
                held = length - 1 if generated and generated[-1] == eos else length
                if not end:
                    self._session_tokens[session_id] = held
                shown = generated[:-1] if stopped else generated
                new_text = self._decode(shown, params, text)
                if new_text is None:  # half a character: wait for the next token
                    continue
                text += new_text
                if stopped:
                    reason = 'stop'
                elif len(generated) >= max_new:
                    reason = 'length'
                yield Delta(new_text, len(shown), reason)
        except LLMError as error:
            if not end and 'no history' in str(error):
                self._session_tokens.pop(session_id, None)
                raise LLMError(str(error), ModelStatusCode.SESSION_CLOSED) from None
            raise
        finally:
            if not finished:  # closed early (a stop word, the caller) or failed: cancel on the server
                self._cancel(session_id)
            responses.close()
            if end:
                self._session_tokens.pop(session_id, None)
        if reason is None:
            count = len(generated) - int(bool(generated) and (generated[-1] == eos or generated[-1] in stop_ids))
            yield Delta('', count, 'length' if max_new and len(generated) >= max_new else 'stop')

    def _turbomind_inputs(self, np, ids, max_new, step, params, stop_ids, eos, session_id, start, end):
        def tensor(name, value):
            spec = P.TURBOMIND_INPUTS[name]
            array = np.asarray(value, dtype=_NUMPY[spec.datatype])
            item = self._grpc.InferInput(name, list(array.shape), spec.datatype)
            item.set_data_from_numpy(array)
            return item

        one = lambda v: [[v]]  # noqa: E731  (lmdeploy sends [1, 1] scalars)
        top_k = params.get('top_k')
        temperature = float(params['temperature'])
        inputs = [tensor('input_ids', [ids]), tensor('input_lengths', one(len(ids))),
                  tensor('request_output_len', one(max_new)), tensor('runtime_top_p', one(float(params['top_p']))),
                  tensor('temperature', one(temperature)),
                  tensor('repetition_penalty', one(float(params['repetition_penalty']))),
                  tensor('step', one(step)), tensor('session_len', one(self.session_len)),
                  tensor('START', one(int(start))), tensor('END', one(int(end))), tensor('STOP', one(0)),
                  tensor('CORRID', one(session_id))]
        greedy = temperature == 0 or top_k == 1
        if greedy or top_k:
            inputs.append(tensor('runtime_top_k', one(1 if greedy else int(top_k))))
        if params.get('ignore_eos'):
            inputs.append(tensor('bad_words_list', [[[eos], [1]]]))
        elif stop_ids:
            inputs.append(tensor('stop_words_list', [[stop_ids, list(range(1, len(stop_ids) + 1))]]))
        if start:
            seed = params.get('seed')
            inputs.append(tensor('random_seed', one(random.getrandbits(63) if seed is None else int(seed))))
        return inputs

    def _stream_text(self, prompt: str, params: Dict[str, Any], session: Session) -> Iterator[Delta]:
        import numpy as np
        if not session.is_fresh:
            raise ValueError("protocol='text' runs one-off requests: sessions need protocol='turbomind'")
        self._require(self.model_name)
        temperature, top_k = float(params['temperature']), params.get('top_k')
        sampling = dict(max_tokens=int(params['max_new_tokens']), temperature=temperature,
                        top_p=float(params['top_p']), top_k=int(top_k) if top_k else -1,
                        repetition_penalty=float(params['repetition_penalty']),
                        stop=params['stop_words'] or None, ignore_eos=bool(params.get('ignore_eos', False)),
                        skip_special_tokens=bool(params.get('skip_special_tokens', False)))
        if params.get('seed') is not None:
            sampling['seed'] = int(params['seed'])
        values = dict(text_input=np.array([prompt.encode('utf-8')], dtype=object), stream=np.array([True]),
                      sampling_parameters=np.array([json.dumps(sampling).encode('utf-8')], dtype=object),
                      exclude_input_in_output=np.array([True]))
        inputs = []
        for name, array in values.items():
            item = self._grpc.InferInput(name, list(array.shape), P.TEXT_INPUTS[name].datatype)
            item.set_data_from_numpy(array)
            inputs.append(item)
        responses = self._start(self.model_name, inputs, params)
        try:
            for result in responses:
                if result is _END:
                    break
                text = result.as_numpy('text_output')
                if text is not None and text.size:
                    yield Delta(b''.join(bytes(t) for t in text.reshape(-1)).decode('utf-8', 'replace'))
        finally:
            responses.close()

    # -- sessions ---------------------------------------------------------------------------------

    def end_session(self, session_id: int) -> None:
        """Ends a kept session and frees its KV cache on the server (lmdeploy's ``Chatbot.end``)."""
        import numpy as np
        self._session_tokens.pop(session_id, None)
        self._control(np, session_id, end=1, stop=0)

    def stop_session(self, session_id: int) -> None:
        """Cancels the session's running turn (lmdeploy's ``Chatbot.cancel``); its KV cache is kept."""
        import numpy as np
        self._control(np, session_id, end=0, stop=1)

    def close(self) -> None:
        """Closes the gRPC channel."""
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests ---------------------------------------------------------------------------------

    def _control(self, np, session_id: int, end: int, stop: int) -> None:
        def tensor(name, value):
            spec = P.TURBOMIND_INPUTS[name]
            item = self._grpc.InferInput(name, [1, 1], spec.datatype)
            item.set_data_from_numpy(np.array([[value]], dtype=_NUMPY[spec.datatype]))
            return item
        inputs = [tensor('input_ids', 1), tensor('input_lengths', 1), tensor('request_output_len', 0),
                  tensor('START', 0), tensor('END', end), tensor('STOP', stop), tensor('CORRID', session_id)]
        for result in self._start(P.TURBOMIND, inputs, {}):
            if result is _END:
                break

    def _start(self, model: str, inputs, params: Dict[str, Any]) -> Iterator[Any]:
        """Sends one request on a new bidirectional stream; yields its responses, then ``_END``."""
        timeout = params.get('timeout', self.timeout)
        answers: 'queue.Queue' = queue.Queue()
        client = self._grpc.InferenceServerClient(self.tritonserver_addr)

        def callback(result, error):
            answers.put((result, error))

        def responses():
            try:
                client.start_stream(callback)
                client.async_stream_infer(model, inputs, request_id=str(params.get('request_id') or ''),
                                          enable_empty_final_response=True)
                while True:
                    try:
                        result, error = answers.get(timeout=timeout)
                    except queue.Empty:
                        raise LLMError(f'the Triton server at {self.tritonserver_addr} sent nothing for {timeout} s '
                                       f'(model {model!r})') from None
                    if error is not None:
                        raise self._error(error, model)
                    final = result.get_response().parameters.get('triton_final_response')
                    if result.get_response().outputs:
                        yield result
                    if final is not None and final.bool_param:
                        yield _END
                        return
            finally:
                try:
                    client.stop_stream(cancel_requests=True)
                finally:
                    client.close()
        return responses()

    def _infer(self, model: str, inputs):
        try:
            return self.client.infer(model, inputs, client_timeout=self.timeout)
        except self._exception() as error:
            raise self._error(error, model) from None

    def _require(self, *models: str) -> None:
        for model in models:
            if model in self._ready_models:
                continue
            try:
                ready = self.client.is_model_ready(model)
            except self._exception() as error:
                raise self._error(error, model) from None
            if not ready:
                raise LLMError(f'the Triton server at {self.tritonserver_addr} does not serve model {model!r}',
                               ModelStatusCode.SESSION_INVALID_ARG)
            self._ready_models.add(model)

    def _encode(self, text: str) -> List[int]:
        import numpy as np
        item = self._grpc.InferInput('QUERY', [1, 1], 'BYTES')
        item.set_data_from_numpy(np.array([[text.encode('utf-8')]], dtype=object))
        result = self._infer(P.PREPROCESSING, [item])
        ids = result.as_numpy('INPUT_ID').reshape(-1)
        length = int(result.as_numpy('REQUEST_INPUT_LEN').reshape(-1)[0])
        return [int(t) for t in ids[:length]]

    def _special_ids(self) -> Tuple[int, int]:
        if self._bos_eos is None:
            self._bos_eos = (self._encode(P.BOS_QUERY)[0], self._encode(P.EOS_QUERY)[0])
        return self._bos_eos

    def _stop_id(self, word: str) -> Optional[int]:
        """The word's token id when it is one token (then the server stops on it), else None."""
        if word not in self._stop_ids:
            bos, _ = self._special_ids()
            ids = self._encode(word)
            if ids and ids[0] == bos:
                ids = ids[1:]
            self._stop_ids[word] = ids[0] if len(ids) == 1 else None
        return self._stop_ids[word]

    def _decode(self, ids: List[int], params: Dict[str, Any], text_so_far: str) -> Optional[str]:
        """The text the ids add to ``text_so_far`` (postprocessing decodes the whole reply), or None while
        it ends in half a character."""
        import numpy as np
        if not ids:
            return ''
        tokens = self._grpc.InferInput('TOKENS_BATCH', [1, 1, len(ids)], 'UINT32')
        tokens.set_data_from_numpy(np.array([[ids]], dtype=np.uint32).reshape(1, 1, len(ids)))
        offset = self._grpc.InferInput('sequence_length', [1, 1], 'UINT32')
        offset.set_data_from_numpy(np.array([[0]], dtype=np.uint32))
        skip = self._grpc.InferInput('skip_special_tokens', [1, 1], 'INT32')
        skip.set_data_from_numpy(np.array([[int(bool(params.get('skip_special_tokens', False)))]], dtype=np.int32))
        result = self._infer(P.POSTPROCESSING, [tokens, offset, skip])
        whole = bytes(result.as_numpy('OUTPUT').reshape(-1)[0]).decode('utf-8', 'replace')
        if whole.endswith('\ufffd'):
            return None
        if not whole.startswith(text_so_far):
            raise LLMError('the Triton server decoded a reply inconsistently (postprocessing)')
        return whole[len(text_so_far):]

    def _cancel(self, session_id: int) -> None:
        try:
            self.stop_session(session_id)
        except Exception as error:  # the request's own error is the one to report
            logger.warning('cancelling session %d on the Triton server failed: %s', session_id, error)

    def _exception(self):
        from tritonclient.utils import InferenceServerException
        return InferenceServerException

    def _error(self, error, model: str) -> LLMError:
        message = error.message() if hasattr(error, 'message') and callable(error.message) else str(error)
        status = str(error.status()) if hasattr(error, 'status') and callable(error.status) else ''
        if 'UNAVAILABLE' in status or 'failed to connect' in message.lower():
            return LLMError(f'cannot reach the Triton server at {self.tritonserver_addr}: {message}')
        if 'NOT_FOUND' in status or 'unknown model' in message.lower():
            return LLMError(f'the Triton server at {self.tritonserver_addr} does not serve model {model!r}: {message}',
                            ModelStatusCode.SESSION_INVALID_ARG)
        if 'DEADLINE' in status:
            return LLMError(f'the Triton server at {self.tritonserver_addr} did not answer in time: {message}')
        last = _reason(message)
        if 'session_len' in last:
            return LLMError(f'model {model!r} refused the request: {last}', ModelStatusCode.SESSION_OUT_OF_LIMIT)
        if 'no history' in last:
            return LLMError(f'model {model!r} refused the request: {last}', ModelStatusCode.SESSION_CLOSED)
        return LLMError(f'model {model!r} on the Triton server at {self.tritonserver_addr} failed: {last}')


def _reason(message: str) -> str:
    """The error line of a Triton error (pytriton sends the infer function's whole traceback)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r'^[\w.]*(Error|Exception): ', line)]
    return errors[-1] if errors else (lines[-1] if lines else message)


_NUMPY = {'UINT32': 'uint32', 'UINT64': 'uint64', 'INT32': 'int32', 'FP32': 'float32', 'BOOL': 'bool'}
