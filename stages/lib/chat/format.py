"""The prompt format a model is trained with, decided once at tokenize time and shipped with the tokenizer.

A `ChatFormat` is a Jinja chat template plus the token rules that go with it:
- the rendered text, tokenized with `add_special_tokens=False` (as `apply_chat_template(tokenize=True)` does),
  is exactly the training sequence, so the tokenizer's own prefix (BOS, ChatGLM2's `[gMASK] <sop>`) is written
  into the template once and never added a second time;
- an answer ends with a stop token: the template's end marker when it is one token (ChatML's `<|im_end|>`),
  else EOS; generation stops at any stop token;
- a tokenizer without a pad token pads with its unk token, else with EOS (pad positions are never trained).
The tokenize stage saves the tokenizer with this template and pad token into data/tokenized/tokenizer; train,
merge and eval load it from there, and merge copies it into models/merged with the stop tokens in
generation_config.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.model_files import save_tokenizer
from ..core.recipes import TemplateRecipe

PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
FORMAT_FILE = "chat_format.json"  # beside the saved tokenizer


@dataclass(frozen=True)
class ChatFormat:
    chat_template: str  # Jinja; see the module docstring
    stop_ids: list[int]  # token ids that end an answer (EOS first)
    eos_id: int  # appended to the last answer when it does not already end in a stop token
    pad_token: str
    prefix_ids: list[int]  # what the tokenizer puts before every text, rendered once by the template
    notes: list[str]  # decisions a user should know about, printed by tokenize
    tools: bool = False  # the template renders tool schemas, calls and results (probed)
    reasoning: bool = False  # the template renders an answer's reasoning_content (probed)
    # how a reply splits into reasoning, tool calls and content (transformers' response template), or None
    response_template: dict | None = None
    text_only: bool = False  # continued pre-training (format: text): rows have no prompt, eval scores loss only


def special_prefix_suffix(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer adds before and after a text on its own (`add_special_tokens=True`)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise UserError("the tokenizer's added special tokens cannot be told apart from the text (encode('x') differs)")


def _literal(text: str) -> str:
    """Jinja for a literal text: a string expression, so whitespace control never touches it."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _part(fmt: str, content: str) -> str:
    pieces = re.split(r"(\{content\}|\{round\})", fmt)
    return "".join(
        "{{ " + content + " }}" if p == "{content}" else "{{ ns.round }}" if p == "{round}" else _literal(p)
        for p in pieces
    )


def to_jinja(template: TemplateRecipe, name: str, prefix: str) -> str:
    """A chat template (Jinja) that renders `template`, after the literal `prefix`, for any messages list.

    Roles system/user/assistant; {round} counts user turns from template.first_round. A system text on a template
    without a system format raises (as transformers' `raise_exception`) instead of being dropped.
    """
    header = template.assistant.split("{content}")[0]
    content = "message['content']"
    # reasoning (stages/lib/chat/conversation.py) leads the answer in a think block, in history as well
    think = ("{%- if message.get('reasoning_content') -%}{{ '<think>\\n' + message['reasoning_content'].strip('\\n') + "
             "'\\n</think>\\n\\n' }}{%- endif -%}")
    before, _, after = template.assistant.partition("{content}")
    answer = _part(before, content) + think + _part("{content}" + after, content)
    no_system = f"template '{name}' has no system format: drop the system text or choose a template with one"
    system = _part(template.system, "system") if template.system else "{{ raise_exception(" + json.dumps(no_system) + ") }}"
    jinja = (
        f"{_literal(prefix)}{{%- set ns = namespace(round={template.first_round}) -%}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {json.dumps(template.default_system, ensure_ascii=False)} -%}}"
        "{%- set turns = messages -%}{%- endif -%}"
        f"{{%- if system -%}}{system}{{%- endif -%}}"
        "{%- for message in turns -%}"
        f"{{%- if message['role'] == 'user' -%}}{_part(template.user, content)}"
        f"{{%- elif message['role'] == 'assistant' -%}}{answer}"
        "{%- set ns.round = ns.round + 1 -%}"
        "{%- else -%}{{ raise_exception('roles must be system (first), user and assistant') }}{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{_part(header, '')}{{%- endif -%}}"
    )
    return jinja.replace("{%- if", "\n{%- if").replace("{%- for", "\n{%- for").replace("{%- endfor", "\n{%- endfor")


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _stop_token(tokenizer, text: str) -> int | None:
    """The id of `text` when it is one special (or added) token, which a server can stop on; else None.
    A plain-word marker would stop generation wherever the word occurs inside an answer."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] in _special_ids(tokenizer) else None


def unknown_marker(tokenizer, template: TemplateRecipe) -> str | None:
    """The first literal text of `template` (a marker such as `<|im_start|>`) that `tokenizer` can only write
    with its unk token, else None. A tokenizer's own chat template is taken as writable."""
    unk = tokenizer.unk_token_id
    if unk is None or template.chat_template:
        return None
    markers = re.findall(r"<\|?/?[\w.]+\|?>", template.jinja)  # a recipe's own Jinja: its tag-like markers
    for text in (*markers, template.system, template.default_system, template.user, template.assistant):
        for piece in re.split(r"\{content\}|\{round\}", text):
            if piece.strip() and unk in tokenizer(piece, add_special_tokens=False)["input_ids"]:
                return piece
    return None


def decide(tokenizer, template: TemplateRecipe, name: str, base_stop_ids: list[int]) -> ChatFormat:
    """The format for `tokenizer` + `template` (a recipes/templates name), checked on a probe conversation.

    `base_stop_ids`: the base model's generation_config eos_token_id(s), kept as stop tokens.
    Raises UserError for a tokenizer without EOS, `template: tokenizer` without a chat template, or a template
    whose rendering the tokenizer cannot reproduce.
    """
    if tokenizer.eos_token_id is None:
        raise UserError("models/base: the tokenizer has no EOS token (eos_token in tokenizer_config.json): set one")
    prefix_ids, _ = special_prefix_suffix(tokenizer)  # a suffix (some tokenizers add EOS) is replaced by our EOS rule
    prefix = "".join(tokenizer.convert_ids_to_tokens(prefix_ids))
    if tokenizer(prefix, add_special_tokens=False)["input_ids"] != prefix_ids:
        raise UserError(f"models/base: the tokenizer adds {prefix!r} to every text but does not read it back as text")
    notes, stop = [], []
    if template.chat_template or template.jinja:
        jinja = tokenizer.chat_template if template.chat_template else template.jinja
        if not isinstance(jinja, str) or not jinja:
            raise UserError(
                "tokenize.template 'tokenizer': the tokenizer in models/base has no chat template; set "
                "tokenize.template: plain (words any vocabulary spells, answers end with EOS) or chatml if it has "
                "ChatML's tokens"
            )
        rendered = tokenizer.apply_chat_template(PROBE, chat_template=jinja, tokenize=False)
        if tokenizer(rendered, add_special_tokens=False)["input_ids"][: len(prefix_ids)] != prefix_ids:
            jinja = _literal(prefix) + jinja  # the model always saw its prefix; the template now renders it
            notes.append(f"the chat template does not render {prefix!r}: it is added in front")
        span = assistant_span(PROBE, jinja, tokenizer)
        last = tokenizer(span, add_special_tokens=False)["input_ids"][-1:]
        if last and last[0] in _special_ids(tokenizer):
            stop.append(last[0])
    else:
        head, _, tail = template.assistant.partition("{content}")
        marker = tail.rstrip()
        if marker:
            marker_id = _stop_token(tokenizer, marker)
            if marker_id is None:  # a text marker cannot stop a server; EOS takes its place, in training and serving
                eos = tokenizer.eos_token
                template = template.model_copy(update={"assistant": f"{head}{{content}}{eos}{tail[len(marker):]}"})
                notes.append(f"end marker {marker!r} is not one special token of this tokenizer: answers end with {eos!r}")
            else:
                stop.append(marker_id)
        jinja = to_jinja(template, name, prefix)
    stop_ids = list(dict.fromkeys([tokenizer.eos_token_id, *stop, *base_stop_ids]))
    pad = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    tools, reasoning = renders_tools(tokenizer, jinja), renders_reasoning(tokenizer, jinja)
    # the recipe's own, else (for the tokenizer's template) the tokenizer's, else one for a think block
    response = template.response_template if template.jinja else None
    if template.chat_template:
        response = getattr(tokenizer, "response_template", None)
    if response is None and reasoning:
        response = reasoning_response_template(tokenizer, jinja, stop_ids)
    return ChatFormat(jinja, stop_ids, tokenizer.eos_token_id, pad, prefix_ids, notes, tools, reasoning, response)


# Probes of what a template can express: each marker must come out in the rendered text.
TOOL_PROBE = (
    [{"role": "user", "content": "Q"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "probe_fn", "arguments": {"probe_key": "probe_arg"}}}]},
     {"role": "tool", "name": "probe_fn", "content": "probe_result"},
     {"role": "assistant", "content": "A"}],
    [{"type": "function", "function": {"name": "probe_tool", "description": "probe_doc", "parameters": {
        "type": "object", "properties": {"probe_key": {"type": "string"}}}}}],
)  # fmt: skip
REASONING_PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A",
                                                      "reasoning_content": "probe_reasoning"}]  # fmt: skip


def _renders(tokenizer, jinja: str, messages: list[dict], markers: tuple[str, ...], tools=None) -> bool:
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=jinja, tokenize=False)
    except Exception:  # the template refuses the probe (raise_exception): it cannot express it
        return False
    return all(m in text for m in markers)


def renders_tools(tokenizer, jinja: str) -> bool:
    """True when `jinja` renders tool schemas, a call's name and arguments, and a tool result."""
    return _renders(tokenizer, jinja, TOOL_PROBE[0], ("probe_tool", "probe_doc", "probe_fn", "probe_arg",
                                                      "probe_result"), TOOL_PROBE[1])  # fmt: skip


def renders_reasoning(tokenizer, jinja: str) -> bool:
    """True when `jinja` renders the last answer's `reasoning_content`."""
    return _renders(tokenizer, jinja, REASONING_PROBE, ("probe_reasoning",))


def reasoning_response_template(tokenizer, jinja: str, stop_ids: list[int]) -> dict:
    """A transformers response template for a format whose answers may open with a <think> block: the answer
    starts after the generation prompt (found by rendering one), reasoning sits in the think block, content runs
    to a stop token."""
    def rendered(**kwargs) -> str:  # as the parser sees it: decoded ids (a lowercasing tokenizer reads "answer :")
        text = tokenizer.apply_chat_template(PROBE[:1], chat_template=jinja, tokenize=False, **kwargs)
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])

    opened, closed = rendered(add_generation_prompt=True), rendered()
    header = opened[len(closed) :] if opened.startswith(closed) else ""
    stops = "|".join(re.escape(t) for t in tokenizer.convert_ids_to_tokens(stop_ids))
    fields = {"reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
              "content": {"close_pattern": rf"\s*(?:{stops})", "content": "text"}}  # fmt: skip
    return {"defaults": {"role": "assistant"}, "fields": fields} | ({"start_anchor": header} if header.strip() else {})


def assistant_span(messages: list[dict], jinja: str, tokenizer) -> str:
    """The text the template renders for the last assistant message (header excluded, trailing space cut)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=jinja, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template renders the prompt differently inside the conversation")
    return full[len(prompt) :].rstrip()


def reload(tokenizer, folder: Path):
    """The tokenizer as it will be loaded from disk: saved into `folder` and read back.

    Tokenize with this one, not the one in memory: a save/load round trip can change how a tokenizer splits text
    (seen: a SentencePiece Llama tokenizer's Metaspace prepend_scheme "always" comes back as "first"), and
    models/merged ships the saved one.
    """
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, folder)
    custom = type(tokenizer).__module__.startswith("transformers_modules")  # loaded with remote code: it stays so
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=custom)


def apply(tokenizer, fmt: ChatFormat) -> None:
    """Set the format on a loaded tokenizer (chat template, pad token, response template) before it is saved."""
    tokenizer.chat_template = fmt.chat_template
    tokenizer.pad_token = fmt.pad_token
    tokenizer.response_template = fmt.response_template  # saved into tokenizer_config.json (transformers >= 5.24)


def save(tokenizer, fmt: ChatFormat, out: Path) -> None:
    """The tokenizer with the format applied, plus chat_format.json (stop ids and the decisions), into `out`."""
    apply(tokenizer, fmt)
    save_tokenizer(tokenizer, out)
    (out / FORMAT_FILE).write_text(json.dumps(asdict(fmt), ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def load(path: Path) -> ChatFormat:
    return ChatFormat(**json.loads((path / FORMAT_FILE).read_text(encoding="utf-8")))
