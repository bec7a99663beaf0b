# Appended by ``cancellation.py`` to pytriton 0.7.0's proxy ``model.py`` (it runs in Triton's Python backend
# stub, beside that file's names), so a client that drops a decoupled stream stops the engine request:
# pytriton's infer-function API never sees Triton's request cancellation, the stub does
# (``InferenceRequest.is_cancelled()``). Each request gets a key in its parameters; while a decoupled
# request runs, a watcher polls ``is_cancelled()`` and sends the key of a cancelled one to the host's socket.
import socket as _lmwrap_socket
import uuid as _lmwrap_uuid

_LMWRAP_SOCKET = os.environ.get("LMWRAP_TRITON_CANCEL_SOCKET")
_LMWRAP_KEYS = {}  # requests_id -> the keys of its requests
_LMWRAP_POLL_S = 0.05


async def _lmwrap_send_requests(self, requests_id, triton_requests, spans=None):
    if spans is None:
        spans = [None] * len(triton_requests)
    requests = [self._wrap_request(r, self._model_inputs_names, s) for r, s in zip(triton_requests, spans)]
    keys = []
    for request in requests:
        key = _lmwrap_uuid.uuid4().hex
        request.parameters = dict(request.parameters or {}, lmwrap_cancel_key=key)
        keys.append(key)
    if self._model_config.get("model_transaction_policy", {}).get("decoupled", False):
        _LMWRAP_KEYS[requests_id] = keys
    payload = self._serializer_deserializer.serialize_requests(requests)
    responses_future = ConcurrentFuture()
    await self._server.send_requests(requests_id, payload, responses_future)
    return responses_future


class _LmwrapQueue:
    """The responses queue, noting its last (EOS) item: past it the requests are released (never poll them)."""

    def __init__(self, queue):
        self._queue, self.done = queue, False

    async def get(self):
        item = await self._queue.get()
        if item[0] & PyTritonResponseFlags.EOS:
            self.done = True
        return item

    def __getattr__(self, name):
        return getattr(self._queue, name)


async def _lmwrap_watch(triton_requests, keys, queue):
    pending = list(zip(triton_requests, keys))
    while pending:
        await asyncio.sleep(_LMWRAP_POLL_S)
        if queue.done:
            return
        still = []
        for request, key in pending:
            try:
                cancelled = request.is_cancelled()  # one IPC call; from this loop only (not from pool threads)
            except Exception:  # the request is gone (completed): nothing to stop
                continue
            if cancelled:
                with _lmwrap_socket.socket(_lmwrap_socket.AF_UNIX, _lmwrap_socket.SOCK_DGRAM) as sock:
                    try:
                        sock.sendto(key.encode(), _LMWRAP_SOCKET)
                    except OSError as error:
                        LOGGER.warning(f"lmwrap: cannot report a cancelled request: {error}")  # noqa: G004
            else:
                still.append((request, key))
        pending = still


_lmwrap_handle_decoupled = DecoupledResponsesHandler.handle_responses


async def _lmwrap_handle_responses(self, scope, responses_queue, responses_future):
    requests_id = scope["requests_id"]
    keys = _LMWRAP_KEYS.pop(requests_id, None)
    watcher = None
    if keys and _LMWRAP_SOCKET:
        responses_queue = _LmwrapQueue(responses_queue)
        watcher = asyncio.ensure_future(_lmwrap_watch(list(self._requests_map[requests_id]), keys,
                                                      responses_queue))
    try:
        return await _lmwrap_handle_decoupled(self, scope, responses_queue, responses_future)
    finally:
        if watcher is not None:
            watcher.cancel()


TritonRequestsServer._send_requests = _lmwrap_send_requests
DecoupledResponsesHandler.handle_responses = _lmwrap_handle_responses
