"""transformers serve's chat-completions replies made OpenAI's: the stop text cut, `data: [DONE]`, error events.

transformers serve (5.24) hands a request's `stop` to generate as stop strings, so generation ends at one, but the
reply still holds it; OpenAI's reply ends before it. Its event stream ends without OpenAI's `data: [DONE]` line,
which clients reading the stream by hand wait for, and an error inside a stream is `{"error": "text"}`, not
OpenAI's `{"error": {"message", ...}}`. `Replies` wraps the ASGI `send` of one request and mends the three; the
JSON reply is buffered whole (it is one message), the stream is mended event by event.
"""

from __future__ import annotations

import json

from .requests import error_body, stop_strings

DONE = b"data: [DONE]\n\n"


class StopCutter:
    """Text of a reply that arrives in pieces, given back up to (not including) the first of `stops`, as soon as
    no stop can begin in it: a tail that could be the start of a stop is held back until the next piece."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held, self.stopped = "", False

    def feed(self, piece: str) -> str:
        """The text that can be passed on now ("" once a stop was seen)."""
        if self.stopped:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return text[: min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, once the reply has ended without a stop."""
        held, self.held = self.held, ""
        return held


def cut(text: str | None, stops: list[str]) -> str | None:
    """`text` up to the first of `stops` (None stays None)."""
    if text is None or not stops:
        return text
    cutter = StopCutter(stops)
    return cutter.feed(text) + cutter.flush()


class Replies:
    """An ASGI `send` for one chat-completions request whose (checked) body is `body`: passes the app's reply on
    with the stop text cut (JSON or event stream), OpenAI's error events and a closing `data: [DONE]`."""

    def __init__(self, send, body: dict):
        self.send, self.stops = send, stop_strings(body)
        self.cutter = StopCutter(self.stops)
        self.start: dict | None = None
        self.stream = False
        self.pending = b""  # the JSON reply, or a stream's incomplete last event

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            self.stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            self.start = message
            if self.stream:
                await self.send(message)
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.pending += message.get("body", b"")
        more = message.get("more_body", False)
        if self.stream:
            events, _, self.pending = self.pending.rpartition(b"\n\n")
            out = b"".join(self._event(e) for e in events.split(b"\n\n") if e) if events else b""
            if not more:
                out += self._event(self.pending) if self.pending.strip() else b""
                out += DONE
            if out or not more:
                await self.send({"type": "http.response.body", "body": out, "more_body": more})
            return
        if more:
            return
        body = self._json(self.pending)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send(dict(self.start, headers=headers + [(b"content-length", str(len(body)).encode())]))
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _json(self, raw: bytes) -> bytes:
        if not self.stops or self.start.get("status") != 200:
            return raw
        try:
            reply = json.loads(raw)
            for choice in reply["choices"]:
                choice["message"]["content"] = cut(choice["message"].get("content"), self.stops)
        except (ValueError, KeyError, TypeError):  # not a completion: passed on as it came
            return raw
        return json.dumps(reply, ensure_ascii=False).encode()

    def _event(self, event: bytes) -> bytes:
        """One server-sent event, mended: its content cut at a stop, a held-back tail put before the last chunk,
        an error in OpenAI's form. An event that is not a JSON chunk passes unchanged."""
        text = event.decode("utf-8", "replace").strip()
        if not text.startswith("data:"):
            return event + b"\n\n"
        try:
            chunk = json.loads(text[len("data:") :])
        except ValueError:
            return event + b"\n\n"
        if isinstance(chunk, dict) and isinstance(chunk.get("error"), str):
            return _sse(error_body(chunk["error"], "server_error"))
        out = b""
        for choice in chunk.get("choices", []) if isinstance(chunk, dict) else []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                delta["content"] = self.cutter.feed(delta["content"])
            if choice.get("finish_reason") is not None and (tail := self.cutter.flush()):
                # the tail held back for a stop that never came, as a chunk of its own before the finish
                before = dict(chunk, choices=[dict(choice, delta={"content": tail}, finish_reason=None)])
                out += _sse(before)
        return out + _sse(chunk)


def _sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
