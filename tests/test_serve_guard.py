"""Who may ask `python -m stages.serve`, and in what types: strict request fields (no conversion, no NaN or
Infinity, seeds in torch's range), the Host header of a loopback server (DNS rebinding), the API key.

Against the real server on the default run's models/merged (tests/test_serve.py's `serving`), spoken to with
raw HTTP bodies (httpx: a client library would never send most of them) and with the `openai` client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import env_with_project
from test_serve import MAX_NEW, client, error_of, free_port, generated, serving, training_prompt, wait_until_healthy
from test_serve import project, reference, server  # noqa: F401 - test_serve's fixtures, used here

KEY = "sk-test-0123456789abcdef"


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


LOOPBACK_HOSTS = ["localhost", "LocalHost:{port}", "127.0.0.1", "127.0.0.1:{port}", "127.8.9.10:{port}", "[::1]",
                  "[::1]:{port}"]  # fmt: skip
OTHER_HOSTS = ["rebound.example", "rebound.example:{port}", "127.0.0.1.rebound.example",
               "localhost.rebound.example:{port}", "[::2]:{port}", "127.1:{port}", "0.0.0.0:{port}",
               "localhost:{port}:{port}", "192.168.1.1"]  # fmt: skip


def test_host_names_of_the_loopback():
    from stages.lib.serve.guard import listens_on_loopback, loopback_host

    assert all(loopback_host(h.format(port=8000)) for h in LOOPBACK_HOSTS)
    assert not any(loopback_host(h.format(port=8000)) for h in OTHER_HOSTS + ["", "::1", "localhost:"])
    assert all(map(listens_on_loopback, ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"]))
    assert not any(map(listens_on_loopback, ["0.0.0.0", "::", "10.1.2.3", "no-such-host.invalid"]))


def test_a_loopback_server_answers_loopback_host_names_only(server, reference):
    """A page of rebound.example whose DNS now says 127.0.0.1 sends `Host: rebound.example`: refused (403, as
    Jupyter and Ollama answer), whatever the route."""
    import httpx

    _, url = server
    port = url.rsplit(":", 1)[1]
    for host in LOOPBACK_HOSTS:
        response = httpx.get(f"{url}/v1/models", headers={"Host": host.format(port=port)}, timeout=60)
        assert response.status_code == 200, (host, response.text)
    for host in OTHER_HOSTS:
        host = host.format(port=port)
        for response in (httpx.get(f"{url}/v1/models", headers={"Host": host}, timeout=60),
                         httpx.get(f"{url}/health", headers={"Host": host}, timeout=60),
                         post(url, chat_request(reference), Host=host)):  # fmt: skip
            error = error_of(response, 403)
            assert error["code"] == "host_not_allowed" and "127.0.0.1" in error["message"], (host, error)
    assert post(url, chat_request(reference)).status_code == 200


@pytest.fixture(scope="module")
def keyed_server(project):
    """The server on every interface (0.0.0.0: any Host) with an API key."""
    with serving(project / "models" / "merged", host="0.0.0.0", api_key=KEY) as running:
        yield running


def test_an_api_key_is_required_on_every_route_but_health(keyed_server, reference):
    import httpx
    import openai as openai_errors
    from openai import OpenAI

    pinned, url = keyed_server
    right = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in right.models.list().data] == [pinned.served.name]
    row = reference["rows"][0]
    answer = right.chat.completions.create(**chat_request(reference))
    assert answer.choices[0].message.content == generated(reference, training_prompt(row))
    # bound to 0.0.0.0: any Host name is served
    assert httpx.get(f"{url}/v1/models", headers={"Host": "models.example", "Authorization": f"Bearer {KEY}"},
                     timeout=60).status_code == 200  # fmt: skip

    for wrong in (KEY[:-1], KEY + "x", "none", KEY.upper()):
        openai = OpenAI(base_url=f"{url}/v1", api_key=wrong, max_retries=0, timeout=60)
        for call in (lambda: openai.models.list(), lambda: openai.chat.completions.create(**chat_request(reference))):
            with pytest.raises(openai_errors.AuthenticationError) as caught:
                call()
            assert caught.value.code == "invalid_api_key" and KEY not in str(caught.value.body), caught.value.body
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}):
        for response in (httpx.get(f"{url}/v1/models", headers=headers, timeout=60),
                         post(url, chat_request(reference), **headers),
                         httpx.post(f"{url}/load_model", json={"model": "gpt2"}, headers=headers,
                                    timeout=60)):  # fmt: skip
            error = error_of(response, 401)
            assert error["code"] == "invalid_api_key" and KEY not in response.text, (headers, error)
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # a liveness probe needs no key
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=60).status_code == 200


def test_serve_command_takes_the_key_from_its_environment_variable(project, reference):
    import httpx
    import openai as openai_errors
    from openai import OpenAI

    env = env_with_project()
    for key, line in [("", "error: DVC_QLORA_API_KEY is empty: give a key, or unset DVC_QLORA_API_KEY to serve "
                           "without one"),
                      ("two words", "error: DVC_QLORA_API_KEY: a key is printable ASCII without spaces")]:  # fmt: skip
        refused = subprocess.run([sys.executable, "-m", "stages.serve"], cwd=project,
                                 env=env | {"DVC_QLORA_API_KEY": key}, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        lines = (refused.stdout + refused.stderr).strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1 and lines[0].startswith(line), lines
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stages.serve", "--port", str(port)], cwd=project,
                            env=env | {"DVC_QLORA_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        wait_until_healthy(proc, port)
        right = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in right.models.list().data] == ["models/merged"]
        with pytest.raises(openai_errors.AuthenticationError):
            OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = proc.stdout.read()
    assert "requests need `Authorization: Bearer KEY`, the key of DVC_QLORA_API_KEY" in log and KEY not in log, log
