"""Conversations → training ids: `input_ids` and `assistant_masks` (1 on the tokens that carry loss).

Each conversation is rendered once by the format's chat template and tokenized once, as a whole, with
`add_special_tokens=False` — the ids `apply_chat_template(..., tokenize=True)` gives. The trained spans (each
assistant answer with its end marker, or only the last) are found by rendering the conversation up to each answer
with and without it, and mapped onto tokens through the tokenizer's character offsets. The text stops at the end
of the last answer; EOS follows unless the answer already ends in a stop token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .format import ChatFormat


@dataclass(frozen=True)
class Rendered:
    text: str  # the conversation up to the end of its last answer
    spans: list[tuple[int, int]]  # character ranges of the trained answers
    prompt: str  # the text a server renders before the last answer (add_generation_prompt=True)


def render(messages: list[dict], fmt: ChatFormat, tokenizer, all_turns: bool) -> Rendered:
    """The text and trained character spans of one conversation (messages end with an assistant turn).

    Raises UserError when the template renders an earlier turn differently once later turns follow (then only
    the last answer can be trained: tokenize.assistant_turns: last).
    """

    def text(msgs: list[dict], open_turn: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=fmt.chat_template, tokenize=False, add_generation_prompt=open_turn
        )

    full = text(messages, False)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in answers if all_turns else answers[-1:]:
        prompt = text(messages[:i], True)
        done = full if i == len(messages) - 1 else text(messages[: i + 1], False)
        if not (full.startswith(prompt) and full.startswith(done) and done.startswith(prompt)):
            hint = "; set tokenize.assistant_turns: last" if all_turns and i != answers[-1] else ""
            raise UserError(f"the chat template renders turn {i} differently once later turns follow{hint}")
        spans.append((len(prompt), len(done.rstrip())))
    return Rendered(full[: spans[-1][1]], spans, prompt)


def encode(tokenizer, rendered: list[Rendered], fmt: ChatFormat, max_length: int) -> dict:
    """Batched tokenization: `input_ids`, `assistant_masks`, `prompt_length` (tokens before the last answer).

    Also counts `truncated` rows (cut to max_length tokens) and lists in `prompt_mismatch` the rows where the text
    before a span boundary does not tokenize to the start of the row's ids (a token spans the boundary), so a
    server's prompt ids would differ from training's there.
    """
    cuts = [[p for a, b in r.spans for p in (a, b) if p < len(r.text)] for r in rendered]
    whole = tokenizer([r.text for r in rendered], add_special_tokens=False)["input_ids"]
    heads = tokenizer([r.text[:p] for r, c in zip(rendered, cuts) for p in c], add_special_tokens=False)["input_ids"]
    out = {"input_ids": [], "assistant_masks": [], "prompt_length": [], "truncated": 0, "prompt_mismatch": []}
    stops, k = set(fmt.stop_ids), 0
    for row, (r, ids, c) in enumerate(zip(rendered, whole, cuts)):
        bounds = []
        for head in heads[k : k + len(c)]:
            bounds.append(len(head))
            if ids[: len(head)] != head and row not in out["prompt_mismatch"]:
                out["prompt_mismatch"].append(row)
        k += len(c)
        bounds.append(len(ids))  # the last span ends with the text
        mask = [0] * len(ids)
        for start, end in zip(bounds[::2], bounds[1::2]):
            mask[start:end] = [1] * (end - start)
        if not ids or ids[-1] not in stops:
            ids, mask = ids + [fmt.eos_id], mask + [1]
        out["prompt_length"].append(bounds[-2])
        if len(ids) > max_length:
            out["truncated"] += 1
            ids, mask = ids[:max_length], mask[:max_length]
        out["input_ids"].append(ids)
        out["assistant_masks"].append(mask)
    return out
