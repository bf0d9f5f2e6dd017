"""Conversations → training ids: `input_ids` and `assistant_masks` (1 on the tokens that carry loss).

Each conversation is rendered by the format's chat template and tokenized as a whole with
`add_special_tokens=False` — the ids `apply_chat_template(..., tokenize=True)` gives. The trained spans (each
assistant answer with its end marker, or only the last) are found by rendering the conversation up to each answer
with and without it. A span's first token is where the tokenized text before it ends (TRL's rule for
prompt-completion data, len(tokenize(prompt))); that needs no character offsets, which some SentencePiece
tokenizers report out of line with the text. The last prompt is checked: its own ids must start the row, as a
server sends them (earlier boundaries only round the mask to whole tokens: a server tokenizes the history as one
text, as here). The text stops at the end of the last answer; EOS follows unless it ends in a stop token.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

from ..core.errors import UserError
from .format import ChatFormat


@dataclass(frozen=True)
class Rendered:
    text: str  # the conversation up to the end of its last answer
    spans: list[tuple[int, int]]  # character ranges of the trained answers
    conversation: int = 0  # the index of the conversation this row comes from
    end: int = 0  # messages of that conversation the row holds (the last trained answer is message end - 1)


class RenderError(UserError):
    def __init__(self, index: int, message: str):
        super().__init__(f"record {index}: {message}")
        self.index = index


def _render_batch(tokenizer, fmt: ChatFormat, conversations: list[list[dict]], open_turn: bool,
                  tools: list[list[dict] | None] | None = None) -> list[str]:
    """apply_chat_template over many conversations, one call per distinct `tools` list (a batch shares its
    tools); a Jinja error is traced to its conversation."""
    if not conversations:
        return []
    tools = tools or [None] * len(conversations)
    groups: dict[str, list[int]] = {}
    for k, t in enumerate(tools):
        groups.setdefault(json.dumps(t, sort_keys=True), []).append(k)
    out: list[str] = [""] * len(conversations)
    for members in groups.values():
        kwargs = {"chat_template": fmt.chat_template, "tokenize": False, "add_generation_prompt": open_turn,
                  "tools": tools[members[0]]}  # fmt: skip
        batch = [conversations[k] for k in members]
        try:
            texts = tokenizer.apply_chat_template(batch, **kwargs)
        except Exception:  # the template raised (raise_exception) or broke: find which conversation, name it
            for k in members:
                try:
                    tokenizer.apply_chat_template(conversations[k], **kwargs)
                except Exception as exc:
                    raise RenderError(k, f"the chat template failed: {exc}") from None
            raise
        for k, text in zip(members, texts):
            out[k] = text
    return out


def render_all(conversations: list[list[dict]], fmt: ChatFormat, tokenizer, all_turns: bool,
               tools: list[list[dict] | None] | None = None, trained: list[list[int]] | None = None) -> list[Rendered]:
    """Training rows: the text and trained character spans of each conversation (each ends with an answer).

    `conversations`: template messages (stages/lib/chat/conversation.py); `tools`: each one's tool schemas (or
    None); `trained`: each one's assistant indices that carry loss (default: every answer, or the last when not
    `all_turns`). Tool results, schemas and prompts are never in a span. Batched renders: every conversation,
    every open prefix (up to an answer's header) and every closed one (up to and with the answer).

    An answer is trained inside the whole conversation when the conversation's text starts with its prompt and
    with its own rendering; a template that renders it differently once later turns follow (Qwen3's drops earlier
    reasoning and think blocks) trains it in a row of its own, the conversation up to that answer, as a server
    would prompt it. Raises RenderError naming the conversation's index when the template fails on it, or renders
    an answer's prompt differently from the conversation that ends with that answer.
    """
    tools = tools or [None] * len(conversations)
    if trained is None:
        answers = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
        trained = [a if all_turns else a[-1:] for a in answers]
    jobs = [(c, i) for c in range(len(conversations)) for i in trained[c]]

    def render(pairs: list[tuple[int, int | None]], open_turn: bool) -> list[str]:
        try:
            return _render_batch(tokenizer, fmt, [conversations[c][:i] for c, i in pairs], open_turn,
                                 [tools[c] for c, _ in pairs])  # fmt: skip
        except RenderError as error:
            raise RenderError(pairs[error.index][0], str(error).split(": ", 1)[1]) from None

    full = render([(c, None) for c in range(len(conversations))], False)
    prompts = dict(zip(jobs, render(jobs, True)))
    inner = [(c, i) for c, i in jobs if i < len(conversations[c]) - 1]
    closed = dict(zip(inner, render([(c, i + 1) for c, i in inner], False)))
    rows = []
    for c, conversation in enumerate(conversations):
        left, end, text = list(trained[c]), len(conversation), full[c]
        while left:
            spans, later = [], []
            for i in left:
                prompt, done = prompts[(c, i)], closed.get((c, i), full[c])
                if text.startswith(prompt) and text.startswith(done) and done.startswith(prompt):
                    spans.append((len(prompt), max(len(prompt), len(done.rstrip()))))  # an empty answer: its end
                elif i == end - 1:
                    raise RenderError(c, f"the chat template renders the prompt of turn {i} differently from the "
                                         "conversation that ends with it")  # fmt: skip
                else:
                    later.append(i)
            if spans:
                rows.append(Rendered(text[: spans[-1][1]], spans, c, end))
            if later:  # the answers this text renders otherwise: a row that ends with the last of them
                end = later[-1] + 1
                text = closed.get((c, later[-1]), full[c])
            left = later
    return rows


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common start of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


CHARS_FLOOR = 1_000_000  # characters of a row always tokenized whole, whatever max_length


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → longest_token (0.1 s for 150k)


def longest_token(tokenizer) -> int:
    """Characters of the longest token string in the vocabulary (its raw form, which is at least as long as the
    text it stands for: byte-level tokens use one character per byte); computed once per tokenizer object."""
    if tokenizer not in _LONGEST:
        _LONGEST[tokenizer] = max(map(len, tokenizer.get_vocab()), default=1)
    return _LONGEST[tokenizer]


def clip(r: Rendered, limit: int) -> Rendered:
    """`r` cut to its first `limit` characters, its spans clipped there (one empty span kept at the cut, so the row
    still has a last answer: the cut leaves it nothing to train)."""
    if len(r.text) <= limit:
        return r
    spans = [(min(a, limit), min(b, limit)) for a, b in r.spans if a < limit] or [(limit, limit)]
    return Rendered(r.text[:limit], spans, r.conversation, r.end)


def encode(tokenizer, rendered: list[Rendered], fmt: ChatFormat, max_length: int) -> dict:
    """Batched tokenization: `input_ids`, `assistant_masks`, `prompt_length` (tokens before the last answer).

    The ids start with exactly what a server tokenizes from the prompt: where a token of the whole text spans the
    prompt/answer boundary (a byte-level BPE can merge `答：` with the answer's first character), the row becomes
    the prompt's ids + the rest's ids, if that decodes to the same text; otherwise the row is listed in
    `prompt_mismatch`, and the token across the boundary is trained as the answer's first. Per-row flags:
    `prompt_mismatch`, `prompt_repaired`, `truncated` (cut to max_length tokens), `answer_cut` (the cut removed
    trained tokens) and `full_length` (tokens before the cut; for a row longer than the clip, before the clip).

    Memory stays bounded: a row is tokenized up to max(CHARS_FLOOR, 4 x max_length x the longest token's
    characters) only. That many characters make at least 4 x max_length tokens, so the first max_length ids are
    those of the whole text; a 50 MB record no longer takes gigabytes to be cut to a few hundred tokens.
    """
    limit = max(CHARS_FLOOR, 4 * max_length * longest_token(tokenizer))
    rendered = [clip(r, limit) for r in rendered]
    cuts = [[p for span in r.spans for p in span] for r in rendered]  # start and end of every trained span
    whole = tokenizer([r.text for r in rendered], add_special_tokens=False)["input_ids"]
    inner = [r.text[:p] for r, c in zip(rendered, cuts) for p in c if p < len(r.text)]
    heads = iter(tokenizer(inner, add_special_tokens=False)["input_ids"] if inner else [])
    out: dict[str, list] = {k: [] for k in ("input_ids", "assistant_masks", "prompt_length", "truncated",
                                           "answer_cut", "prompt_mismatch", "prompt_repaired", "full_length")}  # fmt: skip
    stops = set(fmt.stop_ids)
    for r, ids, c in zip(rendered, whole, cuts):
        prefixes = [next(heads) if p < len(r.text) else ids for p in c]  # the last span ends with the text
        prompt = prefixes[-2]
        mismatch = repaired = False
        if ids[: len(prompt)] != prompt:
            fixed = prompt + tokenizer(r.text[c[-2] :], add_special_tokens=False)["input_ids"]
            repaired = tokenizer.decode(fixed) == tokenizer.decode(ids)
            mismatch = not repaired
            if repaired:
                ids, prefixes[-1] = fixed, fixed
        # token index of each cut: a span starts where the row stops agreeing with the text before it (so a token
        # across the boundary is trained), and ends after the tokens of the text up to its end
        bounds = [_common(head, ids) if k % 2 == 0 else len(head) for k, head in enumerate(prefixes)]
        mask = [0] * len(ids)
        for start, end in zip(bounds[::2], bounds[1::2]):
            mask[start:end] = [1] * (end - start)
        if not ids or ids[-1] not in stops:
            ids, mask = ids + [fmt.eos_id], mask + [1]
        truncated = len(ids) > max_length
        answer_cut = truncated and any(mask[max_length:])
        full_length = len(ids)
        ids, mask = ids[:max_length], mask[:max_length]
        for key, value in zip(out, (ids, mask, bounds[-2], truncated, answer_cut, mismatch, repaired, full_length)):
            out[key].append(value)
    return out
