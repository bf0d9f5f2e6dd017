"""An ASGI layer in front of transformers serve's FastAPI app: who may ask (the Host header, the API key), only the
OpenAI routes this project serves, and every chat-completions body checked (requests.check_chat) before the app
sees it.

Routes: GET /v1/models, GET /health, POST /v1/chat/completions. transformers serve's other routes (loading any
model or path named in a request, /reset, audio, /v1/responses, plain-text /v1/completions, which skip the chat
template) answer 404 here: a server of the tuned model answers in its training format only. A refused request gets
OpenAI's error JSON; nothing reaches the model, so the server goes on serving. Replies pass through
replies.Replies (the stop text cut, `data: [DONE]`).

A server listening on a loopback address answers only requests whose Host names the loopback (localhost,
127.x.x.x, [::1]): a web page whose domain its owner points at 127.0.0.1 (DNS rebinding) sends its own domain as
Host, and gets a 403, as Jupyter and Ollama answer it. With an API key, every request but GET /health must carry
`Authorization: Bearer KEY` (401 `invalid_api_key` otherwise, as OpenAI answers).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import socket
import threading
from typing import Callable

from .replies import Replies
from .requests import RequestError, error_body, parse_json

CHAT = "/v1/chat/completions"
ROUTES = {"/v1/models": ("GET", "HEAD", "OPTIONS"), "/health": ("GET", "HEAD"), CHAT: ("POST",)}
MAX_BODY = 64 * 2**20  # bytes; a larger request body is refused before it is read whole
API_KEY_ENV = "DVC_QLORA_API_KEY"  # the environment variable that gives the key when --api-key does not


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


async def _respond(scope, receive, send, status: int, body: dict, headers: dict | None = None) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


def listens_on_loopback(host: str) -> bool:
    """Whether listening on `host` (an address or a name, as --host gives it) reaches this machine only: an address
    in 127.0.0.0/8 or ::1, or a name every address of which is one (localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


HOST = re.compile(r"(?P<name>\[[^\]]*\]|[^:\[\]]*)(?::[0-9]{1,5})?")  # a Host header value: name, or [IPv6], and a port


def loopback_host(value: str) -> bool:
    """Whether a Host header `value` names the loopback: localhost, 127.x.x.x or [::1], with or without a port
    (any letter case). A browser sends the name of the page's URL as it is: a rebound domain stays the domain."""
    match = HOST.fullmatch(value)
    if not match:
        return False
    name = match["name"].lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.IPv6Address(name[1:-1]) if name.startswith("[") else ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return address.is_loopback


def _headers(scope, name: bytes) -> list[str]:
    """The values of the request header `name` (lower case), as sent."""
    return [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name]


def _digest(key: str) -> bytes:
    # keys are compared as digests: the same length whatever was sent, so the time taken tells nothing of the key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Guard:
    """ASGI app: `app` behind the Host and API-key checks, the route filter and `check` (a request dict → the dict
    to pass on, or RequestError) on each chat-completions body. `loopback`: the server listens on a loopback
    address (only loopback Host values); `api_key`: the key every route but GET /health requires (None: none)."""

    def __init__(self, app, check: Callable[[object], dict], loopback: bool = False, api_key: str | None = None):
        self.app, self.check, self.loopback = app, check, loopback
        self.key = _digest(api_key) if api_key is not None else None
        self.lock = threading.Lock()

    def _check(self, body) -> dict:
        # in a worker thread: rendering and tokenizing a long prompt must not stall the event loop (other
        # requests, streams); one at a time, as a fast tokenizer refuses concurrent use ("Already borrowed")
        with self.lock:
            return self.check(body)

    def _refusal(self, scope) -> RequestError | None:
        """Why the request may not be served at all (a non-loopback Host on a loopback server, no or a wrong API
        key), or None."""
        if self.loopback:
            hosts = _headers(scope, b"host")
            if len(hosts) != 1 or not loopback_host(hosts[0]):
                sent = f"Host {hosts[0][:100]!r}" if len(hosts) == 1 else f"{len(hosts)} Host headers"
                return RequestError(403, f"{sent} is not a name of this server: it listens on a loopback address and "
                                    "answers requests for localhost, 127.x.x.x or [::1] only (a page of another "
                                    "domain must not reach it); use http://127.0.0.1:PORT, or serve with --host "
                                    "0.0.0.0 to be reached by other names", code="host_not_allowed")  # fmt: skip
        if self.key is None or (scope["path"] == "/health" and scope["method"] in ("GET", "HEAD")):
            return None
        given = _headers(scope, b"authorization")
        scheme, _, token = given[0].strip().partition(" ") if len(given) == 1 else ("", "", "")
        if scheme.lower() != "bearer" or not token.strip():
            return RequestError(401, "this server requires an API key: send it as `Authorization: Bearer KEY` (the "
                                "openai client's api_key)", code="invalid_api_key")  # fmt: skip
        if not hmac.compare_digest(_digest(token.strip()), self.key):
            return RequestError(401, "incorrect API key: send the key the server was started with (--api-key or "
                                f"{API_KEY_ENV})", code="invalid_api_key")  # fmt: skip
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":  # the app's startup and shutdown
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # a websocket: no route of this server takes one
            return await send({"type": "websocket.close", "code": 1008})
        refusal = self._refusal(scope)
        if refusal is not None:
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
            return await _respond(scope, receive, send, refusal.status, refusal.body(), headers)
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
