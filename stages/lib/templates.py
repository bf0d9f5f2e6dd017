"""From a raw record to (prompt text, completion text): record formats and prompt templates."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError
from .recipes import TemplateRecipe

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Dialogue:
    """One training example: earlier turns, the last query and the answer the model learns."""

    query: str
    response: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None

    def messages(self, default_system: str = "") -> list[dict]:
        system = self.system or default_system
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": self.query}, {"role": "assistant", "content": self.response}]


class RecordError(UserError):
    pass


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


PARSERS = {"alpaca": from_alpaca, "messages": from_messages}


def render(dialogue: Dialogue, template: TemplateRecipe, tokenizer=None) -> tuple[str, str]:
    """Prompt and completion text; the completion ends where the model should stop (EOS is added later)."""
    if template.chat_template:
        msgs = dialogue.messages(template.default_system)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise RecordError("the tokenizer's chat template renders the prompt differently inside the conversation")
        return prompt, full[len(prompt) :].rstrip("\n")
    if dialogue.history and not template.turn:
        raise RecordError("a multi-turn record needs a template with a 'turn' format")
    system = dialogue.system or template.default_system
    text = template.system.format(system=system) if system and template.system else ""
    for i, (q, a) in enumerate(dialogue.history):
        text += template.turn.format(query=q, response=a, round=template.first_round + i)
    text += template.prompt.format(query=dialogue.query, round=template.first_round + len(dialogue.history))
    return text, dialogue.response + template.completion_suffix


def prompt_completion(record: dict, fmt: str, template: TemplateRecipe, tokenizer, index: int) -> tuple[str, str]:
    if fmt == "prompt_completion":  # already formatted text, used as is
        return _text(record, "prompt", index), _text(record, "completion", index)
    return render(PARSERS[fmt](record, index), template, tokenizer)


def reference(record: dict, fmt: str, index: int) -> str:
    """The answer text alone, for generation metrics."""
    if fmt == "prompt_completion":
        return _text(record, "completion", index)
    return PARSERS[fmt](record, index).response
