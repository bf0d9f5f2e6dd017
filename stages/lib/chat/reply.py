"""Generated ids → the reply a server returns: content, reasoning and tool calls, split as `transformers serve` does.

The training tokenizer carries a response template (stages/lib/chat/format.py) when its format has reasoning or
tool-call syntax; transformers' `parse_response` reads it (the same parser transformers serve runs), so eval, chat
and the server see one answer. Without a template (or on a transformers without the parser) the reply is the text
up to the first stop token with special tokens dropped, and a leading <think> block is still moved to reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.turns import split_think


@dataclass
class Reply:
    content: str
    reasoning: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's shape: {"type", "function": {"name", "arguments"}}


def parse(tokenizer, new_ids: list[int], stop_ids: list[int], prompt_ids: list[int] | None = None) -> Reply:
    """The reply in `new_ids` (generated after `prompt_ids`), up to the first of `stop_ids`."""
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(new_ids) if t in stops), len(new_ids))
    template = getattr(tokenizer, "response_template", None)
    if template is not None and hasattr(tokenizer, "parse_response"):
        prefix = list(prompt_ids or [])
        anchor = template.get("start_anchor") if isinstance(template, dict) else None
        if prefix and anchor and anchor not in tokenizer.decode(prefix):
            prefix = []  # the prompt decodes otherwise than it was written: the reply is the new ids alone
        try:
            parsed = tokenizer.parse_response(new_ids[: end + 1], template, prefix=prefix)
        except Exception:  # noqa: BLE001 - a malformed generation (a call that is no JSON): keep it as text
            parsed = None
        if isinstance(parsed, dict):
            calls = [c if "function" in c else {"type": "function", "function": c}
                     for c in parsed.get("tool_calls") or []]  # fmt: skip
            content = parsed.get("content") or ""
            return Reply(content.strip(), parsed.get("reasoning_content") or parsed.get("thinking"), calls)
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    reasoning, content = split_think(text)
    return Reply(content.strip(), reasoning)
