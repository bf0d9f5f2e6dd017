"""Streaming a reply to a terminal readably: a think block shown as `[reasoning] …`, tool calls as
`[tool call] name({...})`, the rest as it comes.

`ReadableStream.feed(text)` takes decoded text as the model writes it and returns what to print now; a piece that
may still turn into `<think>` or `<tool_call>` is held back until it cannot. From the first `<tool_call>` on,
nothing raw is printed: `finish(reply)` prints the calls as the response template parsed them (stages/lib/chat/
reply.py), so the terminal shows what a server returns, not the template's markup.
"""

from __future__ import annotations

import json

from .reply import Reply

THINK_OPEN, THINK_CLOSE, CALL_OPEN = "<think>", "</think>", "<tool_call>"


class ReadableStream:
    """Turns a reply's text, piece by piece, into what a person reads (see the module docstring)."""

    def __init__(self):
        self.held = ""  # text not shown yet
        self.thinking = False
        self.calls = False  # a tool call began: the rest is shown parsed, by finish()
        self.started = False  # anything shown (leading whitespace of the answer is dropped)

    def feed(self, text: str) -> str:
        if self.calls:
            return ""
        self.held += text
        out = ""
        while True:
            if self.thinking:
                end = self.held.find(THINK_CLOSE)
                if end < 0:
                    return out
                reasoning = self.held[:end].strip()
                out += f"[reasoning] {reasoning}\n" if reasoning else ""
                self.held, self.thinking = self.held[end + len(THINK_CLOSE) :].lstrip("\n"), False
                continue
            head = self.held.lstrip() if not self.started else self.held
            if head.startswith(THINK_OPEN):
                self.held, self.thinking = head[len(THINK_OPEN) :], True
                continue
            call = head.find(CALL_OPEN)
            if call >= 0:
                out += head[:call].rstrip()
                self.started = self.started or bool(out.strip())
                self.held, self.calls = "", True
                return out
            if not head or (not self.started and THINK_OPEN.startswith(head)):
                return out
            keep = next((k for k in range(len(CALL_OPEN) - 1, 0, -1) if head.endswith(CALL_OPEN[:k])), 0)
            cut = len(head[: len(head) - keep].rstrip())  # trailing space waits: a call may follow it
            shown, self.held = head[:cut], head[cut:]
            self.started = self.started or bool(shown)
            return out + shown

    def finish(self, reply: Reply) -> str:
        """What is left to print once the reply is complete: held text, then its tool calls."""
        held = self.held if self.started else self.held.lstrip()
        lines = [] if self.calls or self.thinking or not held.strip() else [held]
        for c in reply.tool_calls:
            f = c.get("function", c)
            args = f.get("arguments")
            shown = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            lines.append(f"[tool call] {f.get('name')}({shown})")
        text = "\n".join(lines)
        return "\n" + text if self.started and reply.tool_calls else text
