"""The Ollama Modelfile beside the GGUF files: the training prompt format as a Go template, its stop tokens as stop
parameters, and a reader that renders such a template back, so the stage checks it builds the training prompts.

Ollama templates are Go text/template, not Jinja, so the template is written from the format's recipe
(recipes/templates: one text per role around `{content}`), not translated from the Jinja chat template. Every
literal is a quoted string action, so no whitespace trimming can touch it. A format the recipe gives only as
Jinja (the tokenizer's own template, qwen3's) or that counts rounds (`{round}`: Go templates cannot add) gets no
TEMPLATE; the GGUF still carries the Jinja template for llama.cpp.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..core.errors import UserError
from ..core.recipes import TemplateRecipe

ROLES = ("system", "user", "assistant")


def _text(text: str) -> str:
    return '{{ ' + json.dumps(text, ensure_ascii=False) + ' }}' if text else ""  # JSON escapes are Go escapes


def _turn(fmt: str) -> str:
    before, _, after = fmt.partition("{content}")
    return _text(before) + "{{ .Content }}" + _text(after)


def go_template(template: TemplateRecipe, prefix: str) -> str | None:
    """The Ollama TEMPLATE (Go text/template over .Messages) that renders `template` after the literal `prefix`,
    ending with the assistant header (the generation prompt); None when the format cannot be one (see module)."""
    if template.chat_template or template.jinja or "{round}" in template.user + template.assistant:
        return None
    branches = [(role, getattr(template, role)) for role in ROLES if getattr(template, role)]
    body = "".join(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}' + _turn(fmt)
                   for i, (role, fmt) in enumerate(branches))  # fmt: skip
    header = template.assistant.partition("{content}")[0]
    return _text(prefix) + "{{ range .Messages }}" + body + "{{ end }}{{ end }}" + _text(header)


@dataclass
class Modelfile:
    """What the stage writes and reads back: FROM file, TEMPLATE, SYSTEM and PARAMETER stop values."""

    source: str  # FROM: the GGUF file, relative to the Modelfile
    template: str | None
    system: str
    stops: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The Modelfile itself (Ollama's syntax: one instruction a line, triple quotes for multi-line values)."""
        lines = ["# The tuned model for Ollama: ollama create NAME -f Modelfile (written by the export stage)",
                 f"FROM ./{self.source}"]  # fmt: skip
        for key, value in (("TEMPLATE", self.template), ("SYSTEM", self.system)):
            if value:
                if '"""' in value:
                    raise UserError(f"the {key} text contains three quotes in a row, which a Modelfile cannot hold")
                lines.append(f'{key} """{value}"""')
        if self.template is None:
            lines.append("# no TEMPLATE: this prompt format has no Go template form; llama.cpp reads the GGUF's")
        lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in self.stops]
        return "\n".join(lines) + "\n"


def parse(text: str) -> Modelfile:
    """A Modelfile's FROM, TEMPLATE, SYSTEM and stop parameters (the instructions this module writes)."""
    values: dict[str, str] = {}
    stops = []
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+("""(.*?)"""|(.*?))$', text, re.M | re.S):
        key, value = m.group(1), m.group(3) if m.group(3) is not None else m.group(4)
        if key == "PARAMETER":
            name, _, raw = value.partition(" ")
            if name == "stop":
                stops.append(json.loads(raw))
        else:
            values[key] = value
    return Modelfile(values.get("FROM", "").removeprefix("./"), values.get("TEMPLATE"), values.get("SYSTEM", ""), stops)


_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def render(template: str, messages: list[dict]) -> str:
    """Render a Go template of the form `go_template` writes (string literals, range .Messages, if/else if eq
    .Role, .Content) as Go's text/template does. ValueError on any other action."""
    tokens: list[tuple[str, str]] = []
    at = 0
    for m in _ACTION.finditer(template):
        if m.group(0).startswith("{{-") or m.group(0).endswith("-}}"):
            raise ValueError(f"whitespace trimming is not used here: {m.group(0)}")
        tokens += [("text", template[at : m.start()]), ("action", m.group(1))]
        at = m.end()
    tokens.append(("text", template[at:]))
    out: list[str] = []
    _run(tokens, 0, None, messages, out, stop_at=())
    return "".join(out)


def _run(tokens, i: int, message: dict | None, messages: list[dict], out: list[str], stop_at: tuple) -> tuple[int, str]:
    """Execute tokens from i until an action in `stop_at`; returns (index of that action, the action)."""
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            out.append(value)
        elif value in stop_at or value.startswith("else if") and "else if" in stop_at:
            return i, value
        elif value.startswith('"'):
            out.append(json.loads(value))
        elif value == ".Content":
            if message is None:
                raise ValueError(".Content outside range .Messages")
            out.append(message["content"])
        elif value == "range .Messages":
            end = i
            for each in messages:
                end, _ = _run(tokens, i + 1, each, messages, out, stop_at=("end",))
            if not messages:
                end, _ = _run(tokens, i + 1, None, messages, [], stop_at=("end",))
            i = end
        elif value.startswith("if "):
            i = _if(tokens, i, message, messages, out)
        else:
            raise ValueError(f"action {{{{ {value} }}}} is not one this reader knows")
        i += 1
    return i, ""


def _if(tokens, i: int, message: dict | None, messages: list[dict], out: list[str]) -> int:
    """An `if eq .Role "x"` chain with `else if` branches up to its `end`; returns the index of that `end`."""
    taken = False
    condition = tokens[i][1]
    while True:
        m = re.fullmatch(r'(?:else )?if eq \.Role ("[^"]*")', condition)
        if not m or message is None:
            raise ValueError(f"condition {condition!r} is not one this reader knows")
        hit = not taken and message["role"] == json.loads(m.group(1))
        i, condition = _run(tokens, i + 1, message, messages, out if hit else [], stop_at=("end", "else if"))
        taken = taken or hit
        if condition == "end":
            return i


def check(modelfile: Modelfile, prompts: list[list[dict]], expected: list[list[int]], encode) -> None:
    """UserError unless the Modelfile's TEMPLATE (with its SYSTEM for prompts without one, as Ollama adds it)
    renders each of `prompts` (messages before an answer) to a text that `encode` (text → token ids) turns into
    the `expected` training prompt ids."""
    if modelfile.template is None:
        return
    for messages, want in zip(prompts, expected):
        if modelfile.system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": modelfile.system}, *messages]
        text = render(modelfile.template, messages)
        if encode(text) != want:
            raise UserError(f"the Modelfile's TEMPLATE renders {text[:80]!r}, which is not the training prompt: the "
                            "recipe's template and data/tokenized disagree; run `dvc repro` from tokenize")  # fmt: skip
