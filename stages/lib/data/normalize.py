"""One record of any supported format → chat messages, or a reason to drop it, or an error naming it.

Formats and their fields (our names; `columns` maps each to the file's own name):
- alpaca: instruction, input (appended to the instruction after a newline), output, system, history
  ([[query, answer], ...] earlier turns);
- messages: messages (OpenAI; ShareGPT's `conversations` is found too), with role/content keys per message
  (ShareGPT's from/value too), a per-record system (ShareGPT's top-level `system`), tools;
- prompt_completion: prompt, completion (text used as is by the `raw` template).
Output: `messages` = [system], user/assistant turns ending with the answer. Records are dropped, with a reason
that is counted, when they have nothing to train: `empty_answer`, `empty_prompt`, `no_answer` (a conversation
ending in a user turn) or `tool_use` (tool calls and results: not trained yet). Everything else that is wrong
(a missing field, a number where text belongs, an unknown role, turns out of order) is a RecordError naming the
source, the record number and the field.
"""

from __future__ import annotations

import hashlib
import json

from ..core.errors import UserError
from ..core.params import FORMAT_FIELDS, DataSource

DEFAULT_ROLES = {
    "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
    "tool": "tool", "function": "tool", "function_call": "tool", "observation": "tool",
}  # fmt: skip
DROP_REASONS = ("empty_answer", "empty_prompt", "no_answer", "tool_use")
TOOL_KEYS = {"tool_calls", "function_call", "tool_call_id"}  # OpenAI's tool use inside a message


class RecordError(UserError):
    pass


class Normalizer:
    """A batched `datasets.map` function for one source: table columns → messages, drop, key, record."""

    def __init__(self, source: DataSource, label: str, column_names: list[str]):
        self.fmt, self.label, self.names = source.format, label, set(column_names)
        self.col = {field: source.columns.get(field, field) for field in FORMAT_FIELDS[self.fmt]}
        self.roles = DEFAULT_ROLES | dict(source.roles)
        # keys inside each message: the mapped one, else OpenAI's, else ShareGPT's
        self.role_keys = (source.columns["role"],) if "role" in source.columns else ("role", "from")
        self.content_keys = (source.columns["content"],) if "content" in source.columns else ("content", "value")
        if self.fmt == "messages" and "messages" not in source.columns and "messages" not in self.names:
            self.col["messages"] = "conversations"  # ShareGPT
        required = {"alpaca": ("instruction", "output"), "messages": ("messages",),
                    "prompt_completion": ("prompt", "completion")}[self.fmt]  # fmt: skip
        for field in sorted(set(source.columns) - {"role", "content"}):  # a mapping names a column that must exist
            if self.col[field] not in self.names:
                raise RecordError(
                    f"source {label}: columns maps '{field}' to '{self.col[field]}', which the file does not have "
                    f"(it has: {', '.join(sorted(self.names))})"
                )
        for field in required:
            if self.col[field] not in self.names:
                found = ", ".join(sorted(self.names)) or "none"
                raise RecordError(
                    f"source {label}: no column '{self.col[field]}' for the {self.fmt} field '{field}' (the file has: "
                    f"{found}); map yours with columns: {{{field}: <your column>}} or pick the right format"
                )
        used = {self.col[f] for f in FORMAT_FIELDS[self.fmt] if f not in ("role", "content")}  # role/content: per message
        self.ignored = sorted(self.names - used)  # listed by download: columns no field of the format reads
        self.message_keys: set[str] = set()  # every key seen inside messages, to list the unused ones

    def unused(self) -> list[str]:
        """Columns and message keys (as messages.<key>) that no field reads, after the records went through."""
        known = {*self.role_keys, *self.content_keys, "weight"} | TOOL_KEYS
        return self.ignored + sorted(f"{self.col['messages']}.{k}" for k in self.message_keys - known)

    def where(self, index: int, field: str) -> str:
        name = self.col.get(field, field)
        shown = f"'{name}'" if name == field else f"'{name}' ({field})"
        return f"source {self.label}, record {index}: {shown}"

    def text(self, value, index: int, field: str, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            got = "missing" if value is None else f"a {type(value).__name__}, not text"
            raise RecordError(f"{self.where(index, field)} is {got}")
        return value

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]
        out = {"messages": [], "drop": [], "key": [], "record": list(indices), "source": [self.label] * len(rows)}
        for row, index in zip(rows, indices):
            messages, reason = getattr(self, f"_{self.fmt}")(row, index)
            if reason is None:
                reason = _empty(messages)
            out["messages"].append(messages if reason is None else [])
            out["drop"].append(reason or "")
            out["key"].append(content_key(messages) if reason is None else "")
        return out

    def _get(self, row: dict, field: str):
        return row.get(self.col[field])

    def _alpaca(self, row: dict, index: int):
        instruction = self.text(self._get(row, "instruction"), index, "instruction")
        extra = self.text(self._get(row, "input"), index, "input", required=False)
        output = self.text(self._get(row, "output"), index, "output")
        system = self.text(self._get(row, "system"), index, "system", required=False)
        messages = [{"role": "system", "content": system}] if system else []
        history = self._get(row, "history") or []
        if not isinstance(history, list):
            raise RecordError(f"{self.where(index, 'history')} must be a list of [query, answer] pairs")
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise RecordError(f"{self.where(index, 'history')} must be a list of [query, answer] text pairs, got {turn!r}")
            messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        query = f"{instruction}\n{extra}" if extra else instruction
        return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": output}], None

    def _prompt_completion(self, row: dict, index: int):
        prompt = self.text(self._get(row, "prompt"), index, "prompt")
        completion = self.text(self._get(row, "completion"), index, "completion")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], None

    def _messages(self, row: dict, index: int):
        raw = self._get(row, "messages")
        if not isinstance(raw, list):
            raise RecordError(f"{self.where(index, 'messages')} must be a list of messages, got {type(raw).__name__}")
        if self._get(row, "tools"):
            return [], "tool_use"
        turns = []
        for n, m in enumerate(raw):
            m = m if isinstance(m, dict) else {}
            present = {k for k, v in m.items() if v not in (None, [], "")}  # Arrow fills other messages' keys: None
            self.message_keys |= present
            if present & TOOL_KEYS:
                return [], "tool_use"
            if m.get("weight") not in (None, 1, 1.0):
                raise RecordError(
                    f"{self.where(index, 'messages')}[{n}] has weight {m['weight']!r}: per-turn weights are not "
                    "supported; remove the turns not to train (or their records), or set tokenize.assistant_turns: last"
                )
            value = _first(m, self.role_keys)
            if value is None:
                raise RecordError(f"{self.where(index, 'messages')}[{n}] has no role key ({' or '.join(self.role_keys)}; "
                                  "map yours with columns: {role: <key>})")  # fmt: skip
            role = self.roles.get(value) if isinstance(value, str) else None
            if role is None:
                raise RecordError(
                    f"{self.where(index, 'messages')}[{n}]: unknown role {value!r}; map it with roles: "
                    f"{{{value}: user|assistant|system|tool}}"
                )
            if role == "tool":
                return [], "tool_use"
            content = _first(m, self.content_keys)
            if not isinstance(content, str):
                got = (f"missing (looked for {' or '.join(self.content_keys)}; map yours with columns: {{content: <key>}})"
                       if content is None else f"a {type(content).__name__}, not text (multimodal parts are not supported)")
                raise RecordError(f"{self.where(index, 'messages')}[{n}] content is {got}")
            turns.append({"role": role, "content": content})
        system = self.text(self._get(row, "system"), index, "system", required=False)
        if turns and turns[0]["role"] == "system":
            if system:
                raise RecordError(f"{self.where(index, 'system')} is given twice: as a field and as the first message")
            system = turns.pop(0)["content"]
        roles = [t["role"] for t in turns]
        if roles and roles[-1] == "user":
            return [], "no_answer"
        if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
            raise RecordError(
                f"{self.where(index, 'messages')}: turns must alternate user/assistant after an optional system "
                f"message, got {roles}"
            )
        return ([{"role": "system", "content": system}] if system else []) + turns, None


def _first(m: dict, keys: tuple[str, ...]):
    return next((m[k] for k in keys if m.get(k) is not None), None)


def _empty(messages: list[dict]) -> str | None:
    """An empty answer anywhere would train just its end marker; an empty last prompt has nothing to answer."""
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        return "empty_answer"
    if not messages[-2]["content"].strip():
        return "empty_prompt"
    return None


def content_key(messages: list[dict]) -> str:
    """A record's identity for the split: equal conversations (duplicates, weighted copies) share it."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
