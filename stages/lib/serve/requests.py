"""Checks of an OpenAI chat-completions request before transformers serve sees it, and OpenAI-style errors.

transformers serve (5.24) answers a request naming another model with a FastAPI `{"detail"}` 400, and empty
messages, an unknown role, a negative `max_tokens` or a `temperature` that is not a number with a bare
`Internal Server Error` 500; a `max_tokens` beyond the model's context is run as asked. `check_chat` turns each of
these into an error OpenAI's clients read (`{"error": {"message", "type", "param", "code"}}`, HTTP 400 or 404) and
fills in what the server should do instead: the model's listed name, and `max_tokens` = the room the context
leaves after the prompt when the request gives none (transformers would default to 1024 new tokens). The prompt
is rendered as the server renders it (its own message conversion, then the model's chat template), so a role the
template refuses is named with the template's message.

Types are strict (`Strict`): transformers serve checks none (it calls `int()`, `float()` and `if stream:` on what
it is sent), and pydantic's default lax mode converted `max_tokens: true` to 1 and `stream: "yes"` to true. The
body is parsed by `parse_json`, which refuses NaN, Infinity and numbers beyond a float (Python's parser reads them);
`seed` is bounded to what torch.manual_seed takes. Each refusal names its field (`param`) and what to send.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

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


_NOT_FINITE = object()  # what the parser leaves where it met NaN, Infinity or a number too large for a float


def _path_of_not_finite(value) -> tuple:
    """The place of the first _NOT_FINITE in a parsed document, as a pydantic-style location (keys and indexes)."""
    todo = [((), value)]  # iterative: a document may nest as deep as the parser allows
    while todo:
        path, node = todo.pop()
        if node is _NOT_FINITE:
            return path
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        todo.extend(reversed([(path + (key,), child) for key, child in items]))
    return ()


def parse_json(raw: bytes | str, where: str = "the request body"):
    """The JSON document `raw`, or RequestError: not JSON, nested deeper than the parser goes, or holding NaN,
    Infinity or a number beyond a float's range (Python's parser reads these, JSON has none; generation would
    divide by them), named by its place."""
    found: list[str] = []

    def not_finite(text: str) -> object:
        found.append(text)
        return _NOT_FINITE

    def number(text: str):
        value = float(text)
        return value if math.isfinite(value) else not_finite(text)

    try:
        value = json.loads(raw, parse_constant=not_finite, parse_float=number)
    except RecursionError:
        raise RequestError(400, f"{where} nests arrays or objects too deeply") from None
    except ValueError as exc:
        raise RequestError(400, f"{where} is not JSON: {exc}") from None
    if found:
        param = _param(_path_of_not_finite(value)) or None
        raise RequestError(400, f"{param or where}: {found[0][:SHOWN]} is not a finite number (JSON has no NaN or "
                           "Infinity, and a float ends near 1.8e308); send a finite number",
                           param)  # fmt: skip
    return value


class Strict(BaseModel):
    """A part of a request: each field of the JSON type OpenAI documents, never converted (`true` is not an
    integer, `"yes"` not a boolean, `5.0` not an integer; an integer is a number). Fields not declared pass on."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str | dict  # OpenAI sends JSON text; transformers serve also takes the object

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, arguments):
        # the chat template iterates the arguments as a mapping: JSON text of anything else fails it
        if isinstance(arguments, str):
            try:
                value = parse_json(arguments, "the text")
            except RequestError as exc:
                raise ValueError(f"send the JSON text of an object ({exc})") from None
            if not isinstance(value, dict):
                raise ValueError("send the JSON text of an object")
        return arguments


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    # None: only an assistant turn that calls tools (OpenAI's shape); checked after tool_calls, hence declared after
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is missing: only an assistant message with tool_calls may leave it out")
        return content


class FunctionDefinition(Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema, rendered by the chat template as given


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


def stop_strings(body: dict) -> list[str]:
    """A request's `stop` as a list (a string, a list of strings, or absent)."""
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else list(stop or [])


MAX_STOP = 1000  # characters per stop string
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (dividing logits by it overflows to NaN)
SEEDS = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes (transformers serve seeds with it); beyond: an error


class ChatRequest(Strict):
    """The fields of a chat-completions request that are checked; others pass on to transformers serve, which
    refuses the ones it does not know (HTTP 422)."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)  # one answer per request
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEEDS[0], le=SEEDS[1])

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
# repetition_penalty, which a negative value breaks; logit bias, log-probabilities and JSON mode it does not do),
# except for the values that ask for nothing (of the type OpenAI documents), which are dropped
UNSUPPORTED = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
               "top_logprobs": (0,), "response_format": ({"type": "text"},)}  # fmt: skip

# the fields of the request models: any other name in a pydantic error location is a member of a union tried
FIELDS = {name for model in (ChatRequest, Message, TextPart, ToolCall, FunctionCall, Tool, FunctionDefinition)
          for name in model.model_fields}  # fmt: skip
# what to send, by pydantic's error type, and for the fields that take one of several types
SEND = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
        "list_type": "an array", "dict_type": "an object", "model_type": "an object"}  # fmt: skip
SEND_ONE_OF = {"content": "a string or a list of text parts ({type: text, text: ...})",
               "stop": "a string or a list of up to 4 strings",
               "arguments": "the arguments as JSON text (or an object)"}  # fmt: skip
SHOWN = 60  # characters of a refused value echoed in an error


def _shown(value) -> str:
    """`value` as JSON, cut to SHOWN characters (an error names what was sent, not megabytes of it)."""
    if isinstance(value, str) and len(value) > SHOWN:
        value = value[:SHOWN]  # before dumping: a huge string is not encoded only to be cut
    text = json.dumps(value, ensure_ascii=False, default=str)
    if not text.isprintable() or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        text = json.dumps(value, default=str)  # escaped: control characters, lone surrogates
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


def _param(loc: tuple) -> str:
    """An error location (keys and indexes) as OpenAI writes a param: `messages[0].role`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _validation_error(exc: ValidationError) -> RequestError:
    """The first of pydantic's errors as one RequestError: the field, what to send, what was sent."""
    first = exc.errors()[0]
    fields = tuple(p for p in first["loc"] if isinstance(p, int) or p in FIELDS)
    param = _param(fields)
    leaf = next((p for p in reversed(fields) if isinstance(p, str)), "")
    if len(fields) < len(first["loc"]) and leaf in SEND_ONE_OF:  # no member of the union took it
        message = f"send {SEND_ONE_OF[leaf]}"
    elif first["type"] in SEND:
        message = f"send {SEND[first['type']]}"
    elif first["type"] == "missing":
        message = "this field is required"
    elif leaf == "seed" and first["type"] in ("greater_than_equal", "less_than_equal"):
        message = f"send an integer from {SEEDS[0]} to {SEEDS[1]} (what torch.manual_seed takes)"
    else:
        message = first["msg"].removeprefix("Value error, ")  # a validator's own message
    if first["type"] != "missing" and first["input"] is not None:
        message += f"; got {_shown(first['input'])}"
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
    is not an object, a refused field, a field of the wrong JSON type (never converted) or range (empty messages, an
    unknown role, content that is not text, max_tokens < 1, n > 1, a seed torch cannot take), messages or tools the
    chat template refuses, a prompt that fills the context
    (`context_length_exceeded`) or a max_tokens (or max_completion_tokens) beyond the room it leaves
    (`invalid_value`). The returned body names the model as /v1/models lists it and has a max_tokens.
    """
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, not {_shown(body)}")
    for key in REFUSED_FIELDS:
        if key in body:
            raise RequestError(400, f"{key}: not accepted by this server (it would change the prompt or the "
                               "length limits); use max_tokens, temperature, top_p, stop", key)  # fmt: skip
    for key, neutral in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
            raise RequestError(400, f"{key}: not supported by this server (transformers serve); leave it out",
                               key, "unsupported_parameter")  # fmt: skip
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if request.model is not None and request.model != served.name and request.model not in served.aliases:
        raise RequestError(404, f"The model {_shown(request.model)} does not exist: this server serves "
                           f"{served.name!r} (GET /v1/models)", "model", "model_not_found")  # fmt: skip
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
