"""An ASGI layer in front of transformers serve's FastAPI app: only the OpenAI routes this project serves, and
every chat-completions body checked (requests.check_chat) before the app sees it.

Routes: GET /v1/models, GET /health, POST /v1/chat/completions. transformers serve's other routes (loading any
model or path named in a request, /reset, audio, /v1/responses, plain-text /v1/completions, which skip the chat
template) answer 404 here: a server of the tuned model answers in its training format only. A refused request gets
OpenAI's error JSON; nothing reaches the model, so the server goes on serving. Replies pass through
replies.Replies (the stop text cut, `data: [DONE]`).
"""

from __future__ import annotations

import json
import threading
from typing import Callable

from .replies import Replies
from .requests import RequestError, error_body, parse_json

CHAT = "/v1/chat/completions"
ROUTES = {"/v1/models": ("GET", "HEAD", "OPTIONS"), "/health": ("GET", "HEAD"), CHAT: ("POST",)}
MAX_BODY = 64 * 2**20  # bytes; a larger request body is refused before it is read whole


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > MAX_BODY:
            raise RequestError(413, f"the request body is larger than {MAX_BODY // 2**20} MiB")
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(scope, receive, send, status: int, body: dict) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status)(scope, receive, send)


class Guard:
    """ASGI app: `app` behind the route filter and `check` (a request dict → the dict to pass on, or
    RequestError) on each chat-completions body."""

    def __init__(self, app, check: Callable[[object], dict]):
        self.app, self.check = app, check
        self.lock = threading.Lock()

    def _check(self, body) -> dict:
        # in a worker thread: rendering and tokenizing a long prompt must not stall the event loop (other
        # requests, streams); one at a time, as a fast tokenizer refuses concurrent use ("Already borrowed")
        with self.lock:
            return self.check(body)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan: the app's startup and shutdown
            return await self.app(scope, receive, send)
        path = scope["path"]
        methods = ROUTES.get(path)
        if methods is None:
            return await _respond(scope, receive, send, 404, error_body(
                f"no route {path}: this server answers POST {CHAT}, GET /v1/models and GET /health", code="not_found"))  # fmt: skip
        if scope["method"] not in methods:
            return await _respond(scope, receive, send, 405, error_body(
                f"{path} takes {' or '.join(methods[:1])}, not {scope['method']}", code="method_not_allowed"))  # fmt: skip
        if path != CHAT:
            return await self.app(scope, receive, send)
        try:
            raw = await _read_body(receive)
            body = parse_json(raw)
            from starlette.concurrency import run_in_threadpool

            passed = await run_in_threadpool(self._check, body)
            try:
                data = json.dumps(passed, ensure_ascii=False).encode()
            except UnicodeEncodeError:  # JSON's \ud800 escapes decode to lone surrogates, which no model can read
                raise RequestError(400, "the request holds text that is not valid Unicode (a lone surrogate such "
                                   "as \\ud800)") from None  # fmt: skip
        except RequestError as exc:
            return await _respond(scope, receive, send, exc.status, exc.body())
        except ConnectionError:
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(data)).encode())])
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # then whatever the client does next (a disconnect)

        await self.app(scope, replay, Replies(send, passed))
