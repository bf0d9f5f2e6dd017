"""data/raw's turns → the messages and tools `apply_chat_template` takes, as an OpenAI client would send them.

data/raw holds turns in one shape (stages/lib/data/turns.py); a chat template expects what transformers documents:
an assistant's `reasoning_content`, its `tool_calls` as `[{"type": "function", "function": {"name", "arguments"}}]`
with the arguments an object, tool results as `{"role": "tool", "content", "name"?, "tool_call_id"?}`, and `tools` a
list of `{"type": "function", "function": {...}}` schemas. The same conversion serves tokenize (training rows),
eval and the prompt rebuild checks, so a server given the same messages and tools renders the same text.
"""

from __future__ import annotations

import json

def template_messages(turns: list[dict], reasoning: str = "train") -> list[dict]:
    """Turns (keys that do not apply absent or None) → template messages; `reasoning: drop` leaves reasoning out."""
    out = []
    for t in turns:
        m = {"role": t["role"], "content": t.get("content") or ""}
        if t["role"] == "assistant":
            if t.get("reasoning") and reasoning == "train":
                m["reasoning_content"] = t["reasoning"]
            if t.get("tool_calls"):
                m["tool_calls"] = [template_call(c) for c in t["tool_calls"]]
        elif t["role"] == "tool":
            m |= {k: t[k] for k in ("name", "tool_call_id") if t.get(k)}
        out.append(m)
    return out


def template_call(call: dict) -> dict:
    """An internal call (`arguments` JSON text) → OpenAI's shape with the arguments as an object (what chat
    templates render with `tojson`)."""
    out = {"type": "function", "function": {"name": call["name"], "arguments": json.loads(call["arguments"])}}
    return out | ({"id": call["id"]} if call.get("id") else {})


def template_tools(tools: str | None) -> list[dict] | None:
    """A record's tools (JSON text, "" or None for none) → the list `apply_chat_template(tools=...)` takes."""
    return json.loads(tools) if tools else None


def trained_answers(turns: list[dict], all_turns: bool, reasoning: str = "train") -> list[int]:
    """Indices of the assistant turns that carry loss: every one not weighted 0 (or only the last of them); with
    `reasoning: drop`, not an answer that is only reasoning (it would train an empty answer)."""
    answers = [i for i, t in enumerate(turns) if t["role"] == "assistant" and t.get("train") is not False
               and (reasoning == "train" or (t.get("content") or "").strip() or t.get("tool_calls"))]  # fmt: skip
    return answers if all_turns else answers[-1:]


def uses_tools(turns: list[dict], tools: str | None) -> bool:
    return bool(tools) or any(t.get("tool_calls") or t["role"] == "tool" for t in turns)


def has_reasoning(turns: list[dict]) -> bool:
    return any(t.get("reasoning") for t in turns)


def canonical_calls(calls: list[dict]) -> list[str]:
    """Calls in OpenAI's shape (arguments an object or JSON text) or the internal one → one JSON text each,
    `{"name", "arguments"}` with sorted keys: what eval compares."""
    out = []
    for c in calls:
        f = c.get("function", c)
        args = f.get("arguments")
        args = json.loads(args) if isinstance(args, str) else args
        out.append(json.dumps({"name": f.get("name"), "arguments": args}, ensure_ascii=False, sort_keys=True))
    return out


def answer_text(content: str, calls: list[dict] | None) -> str:
    """An answer as eval scores it: its content (reasoning excluded), then each tool call on a line of its own."""
    return "\n".join([content.strip(), *canonical_calls(calls or [])]).strip()
