"""One record of any supported format → internal turns, or a reason to drop it, or an error naming it.

Formats and their fields (our names; `columns` maps each to the file's own name):
- alpaca: instruction, input (appended to the instruction after a newline), output, system, history
  ([[query, answer], ...] earlier turns);
- messages: messages (OpenAI; ShareGPT's `conversations` is found too), with role/content keys per message
  (ShareGPT's from/value too), a per-record system (ShareGPT's top-level `system`), tools (the record's tool
  schemas); tool calls, tool results, reasoning, content parts and per-turn weights in the layouts turns.py reads;
- prompt_completion: prompt, completion (text used as is by the `raw` template);
- text: text (continued pre-training: one assistant turn with no prompt, every token trained).
Output: `messages` = [system], then user, assistant and tool turns ending with an answer (turns.py's shape), and
`tools` (JSON text, "" for none). Records are dropped, with a reason that is counted, when they have nothing to
train: `empty_answer`, `empty_prompt`, `no_answer` (a conversation ending in a user or tool turn) or
`no_trained_turn` (every answer weighted 0). Everything else that is wrong (a missing field, a number where text
belongs, an unknown role, turns out of order) is a RecordError naming the source, the record number and the
field. Files SFT would train wrongly are refused by their columns: preference pairs (`chosen`/`rejected`), KTO
labels (a boolean `label`) and images, audio or video.
"""

from __future__ import annotations

import hashlib
import json

from ..core.errors import UserError
from ..core.params import FORMAT_FIELDS, DataSource
from . import turns

DEFAULT_ROLES = {
    "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool", "function_call": "function_call",
}  # fmt: skip
DROP_REASONS = ("empty_answer", "empty_prompt", "no_answer", "no_trained_turn")
CALL_KEYS = {"tool_calls", "function_call"}  # an assistant message's calls (OpenAI, and its older single call)
PREFERENCE = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"),
              ("chosen_response", "rejected_response"))  # fmt: skip
MEDIA_COLUMNS = ("images", "image", "videos", "video", "audios", "audio")
KTO_COLUMNS = ("label", "kto_tag")  # TRL's unpaired preference label, LLaMA-Factory's
LAYOUTS = ("plain", "tool_calls", "tool_results", "tool_schemas", "reasoning", "content_parts", "weighted_turns")


def _turn_features():
    from datasets import Features, List, Value

    call = {"id": Value("string"), "name": Value("string"), "arguments": Value("string")}
    turn = {"role": Value("string"), "content": Value("string"), "reasoning": Value("string"),
            "tool_calls": List(call), "tool_call_id": Value("string"), "name": Value("string"),
            "train": Value("bool")}  # fmt: skip
    return Features({"messages": List(turn), "tools": Value("string"), "drop": Value("string"),
                     "key": Value("string"), "record": Value("int64"), "source": Value("string")})  # fmt: skip


class RecordError(UserError):
    pass


def refuse_layout(label: str, names: set[str], fmt: str) -> None:
    """RecordError for files whose columns say SFT would learn the wrong thing from them."""
    field, target = ("completion", "prompt_completion") if fmt == "prompt_completion" else ("messages", "messages")
    for pair in PREFERENCE:
        if set(pair) <= names:
            how = (f"train the chosen ones with columns: {{{field}: {pair[0]}}} (format {target})"
                   if "prompt" not in names or fmt == "prompt_completion" else
                   f"train the chosen ones by joining 'prompt' and '{pair[0]}' into one messages list per record")
            raise RecordError(
                f"source {label} is preference data (columns '{pair[0]}' and '{pair[1]}'): SFT would learn the "
                f"rejected answers too; {how}, or use a preference trainer (DPO) outside this pipeline"
            )
    if fmt != "messages" and names & {"tools", "functions"}:
        column = sorted(names & {"tools", "functions"})[0]
        raise RecordError(f"source {label} has a '{column}' column (tool schemas), which format {fmt} cannot carry: "
                          "give the records as format messages (the calls as assistant tool_calls), so the schemas "
                          "reach the prompt")  # fmt: skip
    media = [c for c in MEDIA_COLUMNS if c in names]
    if media:
        raise RecordError(f"source {label} has a '{media[0]}' column (images, audio or video with the text): "
                          f"{turns.TEXT_ONLY}")  # fmt: skip


class Normalizer:
    """A batched `datasets.map` function for one source: table columns → messages, tools, drop, key, record."""

    features = staticmethod(_turn_features)

    def __init__(self, source: DataSource, label: str, column_names: list[str]):
        self.fmt, self.label, self.names = source.format, label, set(column_names)
        self.col = {field: source.columns.get(field, field) for field in FORMAT_FIELDS[self.fmt]}
        self.roles = DEFAULT_ROLES | dict(source.roles)
        # keys inside each message: the mapped one, else OpenAI's, else ShareGPT's
        self.role_keys = (source.columns["role"],) if "role" in source.columns else ("role", "from")
        self.content_keys = (source.columns["content"],) if "content" in source.columns else ("content", "value")
        if self.fmt == "messages" and "messages" not in source.columns and "messages" not in self.names:
            self.col["messages"] = "conversations"  # ShareGPT
        if self.fmt == "messages" and "tools" not in source.columns and "tools" not in self.names:
            self.col["tools"] = "functions"  # OpenAI's older name for the record's tool schemas
        mapped = set(self.col.values()) & self.names
        refuse_layout(label, self.names - mapped, self.fmt)
        required = {"alpaca": ("instruction", "output"), "messages": ("messages",),
                    "prompt_completion": ("prompt", "completion"), "text": ("text",)}[self.fmt]  # fmt: skip
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
        self.layouts: dict[str, int] = dict.fromkeys(LAYOUTS, 0)  # kept records per layout (a record may have several)
        self._parts = False  # the record being read has content parts

    def unused(self) -> list[str]:
        """Columns and message keys (as messages.<key>) that no field reads, after the records went through."""
        known = {*self.role_keys, *self.content_keys, *turns.WEIGHT_KEYS, *turns.REASONING_KEYS} | CALL_KEYS
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
        out = {"messages": [], "tools": [], "drop": [], "key": [], "record": list(indices),
               "source": [self.label] * len(rows)}  # fmt: skip
        for row, index in zip(rows, indices):
            kto = next((k for k in KTO_COLUMNS if row.get(k) in (True, False, 0, 1) and k not in self.col.values()),
                       None)  # fmt: skip
            if kto is not None:
                raise RecordError(
                    f"source {self.label}, record {index}: a '{kto}' of {row[kto]!r} beside the conversation is KTO "
                    "data (false or 0 marks an undesirable answer): SFT would learn those too; keep only the records "
                    "marked desirable, then remove the column"
                )
            self._parts = False
            messages, reason, tools = getattr(self, f"_{self.fmt}")(row, index)
            if reason is None:
                reason = _empty(messages)
            if reason is None:
                for layout in self.layouts_of(messages, tools):
                    self.layouts[layout] += 1
            out["messages"].append(messages if reason is None else [])
            out["tools"].append(tools if reason is None else "")
            out["drop"].append(reason or "")
            out["key"].append(content_key(messages, tools) if reason is None else "")
        return out

    def layouts_of(self, messages: list[dict], tools: str) -> list[str]:
        """The layouts a kept record shows (LAYOUTS), `plain` when none."""
        found = [name for name, has in (
            ("tool_calls", any(m["tool_calls"] for m in messages)),
            ("tool_results", any(m["role"] == "tool" for m in messages)),
            ("tool_schemas", bool(tools)), ("reasoning", any(m["reasoning"] for m in messages)),
            ("content_parts", self._parts), ("weighted_turns", any(m["train"] is False for m in messages)),
        ) if has]  # fmt: skip
        return found or ["plain"]

    def _get(self, row: dict, field: str):
        return row.get(self.col[field])

    def _alpaca(self, row: dict, index: int):
        instruction = self.text(self._get(row, "instruction"), index, "instruction")
        extra = self.text(self._get(row, "input"), index, "input", required=False)
        output = self.text(self._get(row, "output"), index, "output")
        system = self.text(self._get(row, "system"), index, "system", required=False)
        messages = [turns.empty_turn("system", system)] if system else []
        history = self._get(row, "history") or []
        if not isinstance(history, list):
            raise RecordError(f"{self.where(index, 'history')} must be a list of [query, answer] pairs")
        for turn in history:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise RecordError(f"{self.where(index, 'history')} must be a list of [query, answer] text pairs, got {turn!r}")
            messages += [turns.empty_turn("user", turn[0]), turns.empty_turn("assistant", turn[1])]
        query = f"{instruction}\n{extra}" if extra else instruction
        return messages + [turns.empty_turn("user", query), turns.empty_turn("assistant", output)], None, ""

    def _text(self, row: dict, index: int):
        """Continued pre-training: the text is one answer with no prompt (tokenize trains every token of it)."""
        return [turns.empty_turn("assistant", self.text(self._get(row, "text"), index, "text"))], None, ""

    def _prompt_completion(self, row: dict, index: int):
        prompt = self.text(self._get(row, "prompt"), index, "prompt")
        completion = self.text(self._get(row, "completion"), index, "completion")
        return [turns.empty_turn("user", prompt), turns.empty_turn("assistant", completion)], None, ""

    def _messages(self, row: dict, index: int):
        raw = self._get(row, "messages")
        if not isinstance(raw, list):
            raise RecordError(f"{self.where(index, 'messages')} must be a list of messages, got {type(raw).__name__}")
        try:
            tools = turns.tools(self._get(row, "tools") if "tools" in self.col else None, "tools")
        except turns.TurnError as exc:
            raise RecordError(f"{self.where(index, 'tools')}: {exc}") from None
        out = []
        for n, m in enumerate(raw):
            try:
                out.append(self._turn(m if isinstance(m, dict) else {}))
            except turns.TurnError as exc:
                raise RecordError(f"{self.where(index, 'messages')}[{n}]: {exc}") from None
        system = self.text(self._get(row, "system"), index, "system", required=False)
        if out and out[0]["role"] == "system":
            if system:
                raise RecordError(f"{self.where(index, 'system')} is given twice: as a field and as the first message")
            system = out.pop(0)["content"]
        offset = len(raw) - len(out)  # a system message popped above
        problem = order_problem([t["role"] for t in out], [bool(t["tool_calls"]) for t in out], offset)
        if problem:
            raise RecordError(f"{self.where(index, 'messages')}: {problem}")
        if out and out[-1]["role"] != "assistant":
            return [], "no_answer", ""
        return ([turns.empty_turn("system", system)] if system else []) + out, None, tools

    def _turn(self, m: dict) -> dict:
        """One source message → the internal turn (turns.py); TurnError names what is wrong."""
        present = {k for k, v in m.items() if v not in (None, [], "")}  # Arrow fills other messages' keys: None
        value = _first(m, self.role_keys)
        if value is None:
            raise turns.TurnError(f"no role key ({' or '.join(self.role_keys)}; map yours with columns: "
                                  "{role: <key>})")  # fmt: skip
        kind = self.roles.get(value) if isinstance(value, str) else None
        if kind is None:
            raise turns.TurnError(f"unknown role {value!r}; map it with roles: {{{value}: user|assistant|system|tool}}")
        role = "assistant" if kind == "function_call" else kind
        self.message_keys |= present - ({"tool_call_id", "name"} if role == "tool" else set())
        turn = turns.empty_turn(role)
        content = _first(m, self.content_keys)
        reasoning: list[str] = []
        if kind == "function_call":  # ShareGPT: the value is the call (or a list of calls) as JSON
            turn["tool_calls"] = turns.calls(content, "the function_call value")
            content = ""
        elif isinstance(content, list):
            self._parts = True
            content, reasoning, found = turns.parts(content, "")
            turn["tool_calls"] = found or None
        elif content is None:
            if role != "assistant" or not present & CALL_KEYS:
                raise turns.TurnError(f"content is missing (looked for {' or '.join(self.content_keys)}; map yours "
                                      "with columns: {content: <key>})")  # fmt: skip
            content = ""
        elif not isinstance(content, str):
            raise turns.TurnError(f"content is a {type(content).__name__}, not text or a list of parts")
        found = [c for key in ("tool_calls", "function_call") if m.get(key) for c in turns.calls(m[key], key)]
        if found:
            if role != "assistant":
                raise turns.TurnError(f"a {role} message holds tool calls: only assistant messages call tools")
            turn["tool_calls"] = (turn["tool_calls"] or []) + found
        reasoning += [m[k] for k in turns.REASONING_KEYS if isinstance(m.get(k), str) and m[k].strip()]
        think, rest = turns.answer_think(content) if role == "assistant" else (None, content)
        if think is not None:
            reasoning.append(think)
            content = rest
        if len(reasoning) > 1 and len(set(r.strip() for r in reasoning)) > 1:
            raise turns.TurnError("reasoning given twice (a reasoning field, a reasoning part or a <think> block): "
                                  "keep one")  # fmt: skip
        if reasoning and role != "assistant":
            raise turns.TurnError(f"a {role} message holds reasoning: only assistant messages reason")
        turn["content"] = content
        turn["reasoning"] = reasoning[0] if reasoning else None
        turn["train"] = turns.weight(m, role)
        if role == "tool":
            turn["tool_call_id"] = m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else None
            turn["name"] = m.get("name") if isinstance(m.get("name"), str) else None
        return turn


def order_problem(roles: list[str], calls: list[bool], offset: int = 0) -> str | None:
    """Why the turn order after the system message is not a conversation, or None. A conversation starts with a
    user turn; an assistant answers a user turn or tool results; tool results follow a turn that called tools.
    Messages are named by their index in the file's list (`offset`: 1 when a system message came first)."""
    if not roles:
        return "no turns"
    follows = {"user": ("assistant",), "assistant": ("user",), "tool": ("tool", "assistant"), "call": ("tool",)}
    if roles[0] != "user":
        return f"the first turn after an optional system message must be a user turn, got {roles[0]}"
    for k in range(1, len(roles)):
        before = "call" if roles[k - 1] == "assistant" and calls[k - 1] else roles[k - 1]
        if roles[k] == "system":
            return f"message {k + offset} is a system message: only the first message may be one"
        if roles[k] not in follows[before]:
            article = "an" if before == "assistant" else "a"
            what = "an assistant turn that calls tools" if before == "call" else f"{article} {before} turn"
            hint = ("; a tool result follows an assistant turn with tool_calls (or function_call): a call written as "
                    "text in the answer is not one; tool results kept as user text (<tool_response>) need roles: "
                    "{tool: user}") if roles[k] == "tool" else ""  # fmt: skip
            return (f"message {k + offset} ({roles[k]}) cannot follow {what}; expected {' or '.join(follows[before])} "
                    f"(roles in order: {', '.join(roles)}){hint}")
    return None


def _first(m: dict, keys: tuple[str, ...]):
    return next((m[k] for k in keys if m.get(k) is not None), None)


def _empty(messages: list[dict]) -> str | None:
    """An empty answer anywhere would train just its end marker (an answer that calls tools or reasons is not
    empty); an empty last user prompt has nothing to answer; answers all weighted 0 leave nothing to train."""
    answers = [m for m in messages if m["role"] == "assistant"]
    if any(not (m["content"].strip() or m["tool_calls"] or m["reasoning"]) for m in answers):
        return "empty_answer"
    if len(messages) > 1 and messages[-2]["role"] == "user" and not messages[-2]["content"].strip():
        return "empty_prompt"
    if all(m["train"] is False for m in messages if m["role"] == "assistant"):
        return "no_trained_turn"
    return None


def content_key(messages: list[dict], tools: str = "") -> str:
    """A record's identity for the split: equal conversations (duplicates, weighted copies) share it."""
    shown = [{k: v for k, v in m.items() if v is not None} for m in messages]  # alpaca rows keep their old keys
    text = json.dumps(shown if not tools else [shown, tools], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
