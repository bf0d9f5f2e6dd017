"""From a raw record to a conversation: alpaca, OpenAI/ShareGPT messages, or prompt/completion text."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RecordError(UserError):
    pass


@dataclass(frozen=True)
class Dialogue:
    """One training example: earlier turns, the last query and the answer the model learns."""

    query: str
    response: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None

    def messages(self) -> list[dict]:
        """OpenAI-style messages: [system], (user, assistant) per earlier turn, then the last user and assistant."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": self.query}, {"role": "assistant", "content": self.response}]


def _text(record: dict, key: str, index: int) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"record {index}: '{key}' must be a string, got {type(value).__name__}")
    return value


def from_alpaca(record: dict, index: int) -> Dialogue:
    instruction, extra = _text(record, "instruction", index), record.get("input") or ""
    history = [(str(q), str(a)) for q, a in record.get("history") or []]
    query = f"{instruction}\n{extra}" if extra else instruction
    return Dialogue(query, _text(record, "output", index), history, record.get("system") or None)


def from_messages(record: dict, index: int) -> Dialogue:
    raw = record.get("messages") or record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise RecordError(f"record {index}: expected a non-empty 'messages' (or ShareGPT 'conversations') list")
    turns = []
    for m in raw:
        role = ROLES.get(m.get("role") or m.get("from"))
        if role is None:
            raise RecordError(f"record {index}: unknown role {m.get('role') or m.get('from')!r}")
        turns.append((role, m.get("content", m.get("value", ""))))
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    roles = [r for r, _ in turns]
    if len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise RecordError(f"record {index}: turns must alternate user/assistant and end with assistant, got {roles}")
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    return Dialogue(pairs[-1][0], pairs[-1][1], pairs[:-1], system)


def from_prompt_completion(record: dict, index: int) -> Dialogue:
    """Already formatted text: the prompt is the user's turn and the completion the answer, both used as is."""
    return Dialogue(_text(record, "prompt", index), _text(record, "completion", index))


PARSERS = {"alpaca": from_alpaca, "messages": from_messages, "prompt_completion": from_prompt_completion}


def dialogue(record: dict, fmt: str, index: int) -> Dialogue:
    """The record as a Dialogue; RecordError names the record and the field that is wrong."""
    return PARSERS[fmt](record, index)
