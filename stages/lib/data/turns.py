"""One message of a source record → the internal turn, whatever layout wrote it.

The internal turn (what data/raw holds; every key present, None where it does not apply, so Arrow sees one shape):
- `role`: system | user | assistant | tool
- `content`: text (text-only content parts joined; an assistant's `<think>…</think>` lead moved to `reasoning`)
- `reasoning`: an assistant's reasoning text, or None
- `tool_calls`: an assistant's calls, `[{"id", "name", "arguments"}]` with `arguments` a JSON object written as text
  (Arrow would merge every record's argument keys into one struct), or None
- `tool_call_id`, `name`: a tool result's call id and function name, or None
- `train`: False for an assistant turn that a per-turn weight excludes, else None

Layouts read: OpenAI (`tool_calls` with `function.name`/`function.arguments` as object or JSON text, the older
`function_call`, `tool` messages with `tool_call_id`/`name`, `reasoning_content`, `weight` 0/1); ShareGPT as
LLaMA-Factory writes it (`function_call` turns whose value is a JSON call or list of calls, `observation` turns);
parts-style messages (`content` a list of `text`, `reasoning`/`thinking` and `tool_call` parts, `loss_weight` 0/1).
Image, audio, video and file parts are refused: this pipeline trains text-only models.

Arrow reads the source files and fills a key that one record lacks but another has with null, at any depth: a
null-valued key inside tool arguments and tool schemas is therefore taken as absent and dropped.
"""

from __future__ import annotations

import json

from ..core.errors import UserError

TEXT_PARTS = {"text", "input_text", "output_text"}
REASONING_PARTS = {"reasoning", "thinking", "reasoning_text"}
CALL_PARTS = {"tool_call", "function_call", "tool_use"}
MEDIA_PARTS = {"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file",
               "input_file", "document"}  # fmt: skip
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # an assistant message's reasoning field
WEIGHT_KEYS = ("weight", "loss_weight")
TEXT_ONLY = "this pipeline trains text-only models: drop these parts or these records"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TurnError(UserError):
    """A message that cannot be read; `str(self)` is the part after "<source, record, message>: "."""


def empty_turn(role: str, content: str = "") -> dict:
    return {"role": role, "content": content, "reasoning": None, "tool_calls": None, "tool_call_id": None,
            "name": None, "train": None}  # fmt: skip


def drop_nulls(value):
    """`value` with every null-valued object key removed, at any depth (Arrow's filler for a key a record lacks)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _json(value, what: str):
    """A JSON text parsed, anything else as it is (nulls dropped); TurnError for text that is not JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise TurnError(f"{what} is text that is not JSON ({exc.msg} at character {exc.pos}): {value[:80]!r}")
    return drop_nulls(value)


def call(value, what: str) -> dict:
    """One tool call in any layout → `{"id", "name", "arguments"}` (arguments: a JSON object as text)."""
    value = _json(value, what)
    if not isinstance(value, dict):
        raise TurnError(f"{what} must be an object with a name and arguments, got {type(value).__name__}")
    inner = value.get("function") if isinstance(value.get("function"), dict) else value  # OpenAI wraps it
    name = inner.get("name")
    if not isinstance(name, str) or not name:
        raise TurnError(f"{what} has no function name (looked for function.name and name)")
    arguments = _json(inner.get("arguments", inner.get("parameters", {})), f"{what} arguments")
    if not isinstance(arguments, dict):
        raise TurnError(f"{what} arguments must be a JSON object, got {type(arguments).__name__}")
    call_id = value.get("id")
    return {"id": str(call_id) if call_id is not None else None, "name": name,
            "arguments": json.dumps(arguments, ensure_ascii=False)}  # fmt: skip


def calls(value, what: str) -> list[dict]:
    """A call or a list of calls (ShareGPT's function_call value, OpenAI's tool_calls) → internal calls."""
    value = _json(value, what)
    items = value if isinstance(value, list) else [value]
    return [call(item, f"{what}[{i}]" if isinstance(value, list) else what) for i, item in enumerate(items)]


def tools(value, what: str) -> str:
    """A record's tool schemas (a list, or JSON text of one) → JSON text of OpenAI-shaped tools
    (`{"type": "function", "function": {...}}`; a bare function schema is wrapped); "" when there are none."""
    if value is None or value == "" or value == []:
        return ""
    value = _json(value, what)
    if not isinstance(value, list):
        value = [value]
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise TurnError(f"{what}[{i}] must be an object (a function schema), got {type(tool).__name__}")
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise TurnError(f"{what}[{i}] has no function name (looked for function.name and name)")
        out.append({"type": "function", "function": function} if function is tool else {**tool, "type": "function"})
    return json.dumps(out, ensure_ascii=False) if out else ""


def weight(m: dict, role: str) -> bool | None:
    """OpenAI `weight` / parts-style `loss_weight`: False for an assistant turn weighted 0, else None."""
    for key in WEIGHT_KEYS:
        value = m.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or value not in (0, 1):
            raise TurnError(f"{key} {value!r}: per-turn weights are 0 (not trained) or 1 (trained)")
        if role == "assistant":
            return False if value == 0 else None
        if value == 1:
            raise TurnError(f"a {role} turn with {key} 1: only assistant turns are trained here")
    return None


def parts(content: list, what: str) -> tuple[str, list[str], list[dict]]:
    """Content parts → (text, reasoning pieces, calls). Text parts are joined with a space, as transformers serve
    joins a request's parts, so that a client sending the same parts gets the training prompt; media parts are
    refused."""
    text, reasoning, found = [], [], []
    for i, part in enumerate(content):
        where = f"{what}content[{i}]"
        if isinstance(part, str):
            text.append(part)
            continue
        if not isinstance(part, dict):
            raise TurnError(f"{where} must be text or a part object, got {type(part).__name__}")
        kind = part.get("type")
        body = next((part[k] for k in ("text", "value", "content", kind) if isinstance(part.get(k), str)), None)
        if kind in MEDIA_PARTS or (kind is None and any(k in part for k in MEDIA_PARTS)):
            raise TurnError(f"{where} is a {kind or 'media'} part: {TEXT_ONLY}")
        if kind in TEXT_PARTS or (kind is None and isinstance(part.get("text"), str)):
            if body is None:
                raise TurnError(f"{where} is a text part without text (looked for text and value)")
            text.append(body)
        elif kind in REASONING_PARTS:
            if body is None:
                raise TurnError(f"{where} is a {kind} part without text (looked for text, value, {kind})")
            reasoning.append(body)
        elif kind in CALL_PARTS:
            payload = next((part[k] for k in ("value", kind, "function") if part.get(k) is not None), part)
            found += calls(payload, where)
        else:
            raise TurnError(f"{where} has the part type {kind!r}; known: text, reasoning, tool_call (and media "
                            "parts, which are refused)")  # fmt: skip
    return " ".join(text), reasoning, found


def split_think(content: str) -> tuple[str | None, str]:
    """`<think>R</think>A` (leading whitespace allowed) → (R, A); content without a leading think block →
    (None, content). R and A are stripped of the newlines templates put around them."""
    head = content.lstrip()
    if not head.startswith(THINK_OPEN) or THINK_CLOSE not in head:
        return None, content
    inner, _, rest = head[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return inner.strip("\n"), rest.lstrip("\n")


def answer_think(content: str) -> tuple[str | None, str]:
    """An answer's reasoning markup → (reasoning, the rest), or TurnError for markup that would train as text.

    Read: a leading `<think>R</think>` block, and R1-style exports whose `<think>` was a prefill of the template
    (`R</think>A`). Refused: a think block after other text, one never closed, a second block."""
    reasoning, rest = split_think(content)
    if reasoning is None and THINK_CLOSE in content and THINK_OPEN not in content:
        inner, _, rest = content.partition(THINK_CLOSE)  # the template wrote <think> itself (R1's prefill)
        reasoning, rest = inner.strip("\n").strip(), rest.lstrip("\n")
    if THINK_OPEN in rest or THINK_CLOSE in rest:
        where = "a second think block" if reasoning is not None else (
            "a <think> block that is never closed" if THINK_CLOSE not in rest else "a think block after other text")
        raise TurnError(f"the answer has {where}: only one <think>…</think> at the start of an answer is reasoning; "
                        "move it there (or into reasoning_content), or remove the markup")
    return reasoning, rest
