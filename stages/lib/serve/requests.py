"""Checks of an OpenAI chat-completions request before transformers serve sees it, and OpenAI-style errors.

transformers serve (5.24) answers a request naming another model with a FastAPI `{"detail"}` 400, and empty
messages, an unknown role, a negative `max_tokens` or a `temperature` that is not a number with a bare
`Internal Server Error` 500; a `max_tokens` beyond the model's context is run as asked. `check_chat` turns each of
these into an error OpenAI's clients read (`{"error": {"message", "type", "param", "code"}}`, HTTP 400 or 404) and
fills in what the server should do instead: the model's listed name, and `max_tokens` = the room the context
leaves after the prompt when the request gives none (transformers would default to 1024 new tokens). The prompt
is rendered as the server renders it (its own message conversion, then the model's chat template), so a role the
template refuses is named with the template's message.
"""

from __future__ import annotations

import json

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# transformers serve extensions that would bypass the checks here: a whole GenerationConfig (any max_new_tokens)
# and template kwargs (another prompt than the training one)
REFUSED_FIELDS = ("generation_config", "chat_template_kwargs")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None  # None: only an assistant turn that calls tools (OpenAI's shape)

    @model_validator(mode="after")
    def _content_or_calls(self):
        if self.content is None and not (self.role == "assistant" and getattr(self, "tool_calls", None)):
            raise ValueError("content is missing: only an assistant message with tool_calls may leave it out")
        return self


def stop_strings(body: dict) -> list[str]:
    """A request's `stop` as a list (a string, a list of strings, or absent)."""
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


MAX_STOP = 1000  # characters per stop string
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (dividing logits by it overflows to NaN)


class ChatRequest(BaseModel):
    """The fields of a chat-completions request that are checked; others pass on to transformers serve, which
    refuses the ones it does not know (HTTP 422)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Literal[1] | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = stop_strings({"stop": stop})
        if len(stops) > 4 or not all(stops):  # OpenAI's limit; an empty stop would end every reply at once
            raise ValueError("give at most 4 stop strings, none of them empty")
        if any(len(s) > MAX_STOP for s in stops):  # the reply is searched for each stop, piece by piece
            raise ValueError(f"a stop string has at most {MAX_STOP} characters")
        return stop


@dataclass
class Served:
    """What the server serves: the name /v1/models lists, other names accepted for it, the tokenizer (with the
    training chat template) and the context length in tokens (None: unknown, not checked)."""

    name: str
    tokenizer: object
    context: int | None
    aliases: set[str] = field(default_factory=set)
    generation: dict = field(default_factory=dict)  # the model's generation_config.json (stop ids), non-defaults
    token_chars: int = 0  # characters of the tokenizer's longest token (0: no bound before tokenizing)

    def __post_init__(self):
        if not self.token_chars and hasattr(self.tokenizer, "get_vocab"):
            self.token_chars = max(map(len, self.tokenizer.get_vocab()), default=0)


# A token stands for at most `token_chars` characters of the text (of its normalized form, which NFKC can shorten a
# few times over, hence the margin): a prompt longer than this many times the context cannot fit, and is refused
# without being rendered and tokenized (seconds for megabytes, during which other requests' checks wait).
NORMALIZATION_MARGIN = 4


def _characters(messages: list) -> int:
    return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or [])
               for m in messages)


# OpenAI fields transformers serve cannot honour: refused rather than ignored (penalties it maps onto
# repetition_penalty, which a negative value breaks; logit bias, log-probabilities and JSON mode it does not do)
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format")


def _param(loc: tuple) -> str:
    """pydantic's error location as OpenAI writes a param: `messages[0].role`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]"):  # the member of a union that was tried, not a field
            break
        else:
            out += f".{part}" if out else str(part)
    return out


def _validation_error(exc: ValidationError) -> RequestError:
    first = exc.errors()[0]
    param = _param(first["loc"])
    if param.startswith("messages[") and param.endswith("].content"):
        message = "a message's content must be a string or a list of text parts ({type: text, text: ...})"
    else:
        message = first["msg"].removeprefix("Value error, ")  # a validator's own message
    return RequestError(400, f"{param}: {message}" if param else message, param or None)


def prompt_ids(tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """The ids transformers serve builds for `messages` (and `tools`, as the request gives them): its own
    conversion of OpenAI messages (content parts joined), then the chat template with the assistant header opened.
    RequestError (param `messages`) with the template's message when it refuses them."""
    from jinja2 import TemplateError
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.utils import Modality

    inputs = ChatCompletionHandler.get_processor_inputs_from_messages(messages, Modality.LLM)
    try:
        out = tokenizer.apply_chat_template(inputs, add_generation_prompt=True, tools=tools, tokenize=True,
                                        return_dict=True)  # fmt: skip
    except TemplateError as exc:
        raise RequestError(400, f"messages: the model's chat template refuses them: {exc}", "messages") from None
    except Exception as exc:  # noqa: BLE001 - malformed tools or tool_calls, unencodable text: the client's input
        raise RequestError(400, f"messages: cannot be rendered with the chat template ({type(exc).__name__}: "
                           f"{str(exc)[:200]})", "messages") from None  # fmt: skip
    return list(out["input_ids"])


def check_chat(body, served: Served) -> dict:
    """The body of a POST /v1/chat/completions to pass on to transformers serve, or RequestError.

    404 `model_not_found` for a model that is not `served` (by its listed name or an alias); 400 for a body that
    is not an object, a refused field, a field of the wrong type or range (empty messages, an unknown role, content
    that is not text, max_tokens < 1, n > 1), messages the chat template refuses, a prompt that fills the context
    (`context_length_exceeded`) or a max_tokens (or max_completion_tokens) beyond the room it leaves
    (`invalid_value`). The returned body names the model as /v1/models lists it and has a max_tokens.
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not a JSON {type(body).__name__}")
    name = body.get("model")
    if name is not None and name != served.name and name not in served.aliases:
        raise RequestError(404, f"The model {name!r} does not exist: this server serves {served.name!r} "
                           "(GET /v1/models)", "model", "model_not_found")  # fmt: skip
    for key in REFUSED_FIELDS:
        if key in body:
            raise RequestError(400, f"{key}: not accepted by this server (it would change the prompt or the "
                               "length limits); use max_tokens, temperature, top_p, stop", key)  # fmt: skip
    for key in UNSUPPORTED:
        if body.get(key) not in (None, 0, False, {}, {"type": "text"}):
            raise RequestError(400, f"{key}: not supported by this server (transformers serve); leave it out",
                               key, "unsupported_parameter")  # fmt: skip
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    characters = _characters(request.messages)
    most = NORMALIZATION_MARGIN * served.token_chars * (served.context or 0)
    if most and characters > most:
        raise RequestError(400, f"messages: the prompt has {characters} characters, which no tokenizing fits into "
                           f"the model's context of {served.context} tokens", "messages",
                           "context_length_exceeded")  # fmt: skip
    ids = prompt_ids(served.tokenizer, body["messages"], body.get("tools"))
    # sampling as OpenAI's API: temperature 1 when not given, greedy only at 0 (transformers serve would decode
    # greedily whenever the model's generation_config.json says nothing, whatever the temperature)
    sample = request.temperature is None or request.temperature >= GREEDY_BELOW
    body = {k: v for k, v in body.items() if k not in UNSUPPORTED}
    if not sample and request.temperature is not None:
        body["temperature"] = 0.0
    if body.get("stop") == []:  # OpenAI: no stop; transformers serve fails on an empty list of stop strings
        del body["stop"]
    body = dict(body, model=served.name, generation_config=json.dumps(served.generation | {"do_sample": sample}))
    if served.context is None:
        return body
    room = served.context - len(ids)
    if room < 1:
        raise RequestError(400, f"messages: the prompt takes {len(ids)} tokens and the model's context is "
                           f"{served.context}", "messages", "context_length_exceeded")  # fmt: skip
    key = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    asked = getattr(request, key)
    if asked is None:
        return dict(body, max_tokens=room)
    if asked > room:
        raise RequestError(400, f"{key} is too large: {asked}. The model's context is {served.context} tokens and "
                           f"the prompt takes {len(ids)}, which leaves at most {room}", key, "invalid_value")  # fmt: skip
    return body
