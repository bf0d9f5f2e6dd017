"""What `python -m stages.serve` takes: strict request fields (no conversion, no NaN or Infinity, seeds in
torch's range).

Against the real server on the default run's models/merged (tests/test_serve.py's `serving`), spoken to with
raw HTTP bodies (httpx: a client library would never send most of them) and with the `openai` client.
"""

from __future__ import annotations

import json

import pytest
from test_serve import MAX_NEW, client, error_of, generated, training_prompt
from test_serve import project, reference, server  # noqa: F401 - test_serve's fixtures, used here


def chat_request(reference, **change) -> dict:
    """A good request for the first validation row (greedy, MAX_NEW tokens), with `change` on top."""
    row = reference["rows"][0]
    return {"model": "merged", "messages": row["messages"][:-1], "max_tokens": MAX_NEW, "temperature": 0} | change


def post(url: str, body: dict | bytes, **headers):
    """POST /v1/chat/completions with `body` as JSON (a dict) or as these bytes."""
    import httpx

    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})  # fmt: skip


def test_fields_of_the_wrong_json_type_are_refused_not_converted(server, reference):
    """pydantic's lax mode read `max_tokens: true` as 1 (a one-token answer) and `stream: "yes"` as true."""
    _, url = server
    good = chat_request(reference)
    user = good["messages"][0]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    for change, param in [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": False}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"temperature": True}, "temperature"),
        ({"temperature": "0"}, "temperature"),
        ({"top_p": "1"}, "top_p"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 5]}, "stop"),
        ({"model": 5}, "model"),
        ({"frequency_penalty": False}, "frequency_penalty"),  # "no penalty" only as the number 0
        ({"messages": [user | {"content": 5}]}, "messages[0].content"),
        ({"messages": [user | {"content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
        ({"messages": [user | {"name": 5}]}, "messages[0].name"),
        ({"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call | {"id": 1}]}]},
         "messages[1].tool_calls[0].id"),
        ({"messages": [user, {"role": "assistant", "content": None, "tool_calls": [
            call | {"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"messages": [user, {"role": "tool", "tool_call_id": 7, "content": "{}"}]}, "messages[1].tool_call_id"),
        ({"tools": [{"type": "function", "function": {"name": ["f"]}}]}, "tools[0].function.name"),
    ]:  # fmt: skip
        error = error_of(post(url, good | change), 400)
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), (change, error)
        assert error["message"].startswith(f"{param}: ") and "\n" not in error["message"], error
        assert any(w in error["message"] for w in ("send", "Input should", "leave it out")), error  # what instead

    import openai as openai_errors

    openai = client(url)
    for change in ({"max_tokens": True}, {"stream": "yes"}, {"temperature": "0.5"}):
        with pytest.raises(openai_errors.BadRequestError) as caught:
            openai.chat.completions.create(**good | change)
        assert caught.value.param == next(iter(change)), caught.value


def test_nan_infinity_and_numbers_beyond_a_float_are_refused_where_they_are(server, reference):
    """Python's JSON parser reads NaN, Infinity and 1e999 (as inf); JSON has none of them."""
    _, url = server
    body = json.dumps(chat_request(reference, temperature=0.5)).encode()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "number", "default": "@"}}}}}  # fmt: skip
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": @}'}}
    user = chat_request(reference)["messages"][0]
    cases = [
        (body.replace(b"0.5", b"NaN"), "temperature"),
        (body.replace(b"0.5", b"Infinity"), "temperature"),
        (body.replace(b"0.5", b"-Infinity"), "temperature"),
        (body.replace(b"0.5", b"1e999"), "temperature"),
        (body[:-1] + b', "seed": -1e400}', "seed"),
        (body[:-1] + b', "metadata": {"a": [1, NaN]}}', "metadata.a[1]"),
        (json.dumps(chat_request(reference, tools=[tool])).encode().replace(b'"@"', b"NaN"),
         "tools[0].function.parameters.properties.x.default"),
        # inside the JSON text of a tool call's arguments, which transformers serve parses too
        (json.dumps(chat_request(reference, messages=[user, {"role": "assistant", "content": None,
                                                             "tool_calls": [call]}])).encode().replace(b"@", b"NaN"),
         "messages[1].tool_calls[0].function.arguments"),
    ]  # fmt: skip
    for raw, param in cases:
        error = error_of(post(url, raw), 400)
        assert error["param"] == param, (raw[-120:], error)
        assert "finite number" in error["message"] and "\n" not in error["message"], error
    # a body too deeply nested for the parser: one 400, not a RecursionError
    deep = body[:-1] + b', "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "too deeply" in error_of(post(url, deep), 400)["message"]
    assert error_of(post(url, b"NaN"), 400)["param"] is None
    # and the server goes on serving
    assert post(url, chat_request(reference)).status_code == 200


def test_seeds_in_torch_range_sample_reproducibly_and_others_are_refused(server, reference):
    """A 2^70 seed was a 500 (torch.manual_seed overflows); the range it takes is -2^63 to 2^64 - 1."""
    import openai as openai_errors

    _, url = server
    openai = client(url)
    request = chat_request(reference, temperature=2.0)
    for seed in (2**64 - 1, -(2**63), 0):
        answers = {openai.chat.completions.create(**request, seed=seed).choices[0].message.content for _ in range(2)}
        assert len(answers) == 1, (seed, answers)  # the seed took effect: the same sample twice
    for seed in (2**64, 2**70, -(2**63) - 1, 10**400):
        with pytest.raises(openai_errors.BadRequestError) as caught:
            openai.chat.completions.create(**request, seed=seed)
        assert caught.value.param == "seed" and "torch.manual_seed" in caught.value.message


def test_what_openai_clients_send_still_works(server, reference):
    """Strict types take nothing OpenAI's API allows: an integer where a number goes, content as text parts,
    null fields, n = 1, a boolean stream."""
    _, url = server
    openai = client(url)
    row = reference["rows"][1]
    expected = generated(reference, training_prompt(row))
    text = row["messages"][0]["content"]
    for messages, change in [
        ([{"role": "user", "content": [{"type": "text", "text": text}]}], {}),
        ([{"role": "user", "content": text, "name": "ann"}], {"temperature": 0, "top_p": 1, "n": 1, "stream": False}),
        (row["messages"][:-1], {"seed": None, "stop": None, "max_completion_tokens": MAX_NEW, "max_tokens": None,
                                "frequency_penalty": 0, "logprobs": False, "response_format": {"type": "text"}}),
    ]:  # fmt: skip
        answer = openai.chat.completions.create(**chat_request(reference, messages=messages) | change)
        assert answer.choices[0].message.content == expected, (messages, change)
