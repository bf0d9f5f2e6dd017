"""Tool calls end to end: a tiny model trained on tool-call records answers an OpenAI client's `tools` request
with `tool_calls` in OpenAI's shape, parsed by transformers serve from the model's own text.

The project runs the real stages (download, tokenize with the qwen3 template, train, merge) on a generated
tool-call set: "Weather in <city>?" → a get_weather call with that city → the tool's result → a one-line answer.
The model memorizes it in a few hundred steps; the server is then asked, with the same tool, about a city it was
trained on (the call is the answer) and, after the tool's result, for the final answer. Nothing is faked: the call
the client receives is what the model generated, parsed by the response template that tokenize saved with the
training tokenizer (and merge copied into models/merged).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, default_params, env_with_project, run
from test_serve import client, serving

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Kyiv", "Bern", "Riga", "Doha", "Cairo", "Lagos", "Quito", "Hanoi",
          "Lyon", "Graz", "Turin", "Baku", "Accra", "Minsk", "Sofia", "Dakar", "Tunis", "Kabul", "Seoul", "Tokyo",
          "Perth", "Dubai", "Milan", "Porto", "Nice", "Malmo", "Split", "Bonn", "Delhi", "Cusco", "Davos", "Hue"]  # fmt: skip


def records() -> list[dict]:
    rng = random.Random(0)
    out = []
    for city in CITIES:
        temp = rng.randint(-5, 30)
        out.append({"tools": [TOOL], "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp_c": temp})},
            {"role": "assistant", "content": f"{city}: {temp} C."}]})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def tool_project(tmp_path_factory) -> Path:
    """download → tokenize → train → merge of the tiny default model on the tool-call set, in a project folder."""
    folder = tmp_path_factory.mktemp("tools")
    (folder / "recipes").symlink_to(ROOT / "recipes")
    (folder / "data" / "sources").mkdir(parents=True)
    (folder / "data" / "sources" / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records()))
    params = default_params()
    params["data"]["sources"] = [{"kind": "local", "path": "data/sources/tools.jsonl", "format": "messages"}]
    params["data"]["validation_fraction"] = 0.05
    params["tokenize"] |= {"template": "qwen3", "max_length": 512}
    params["train"] |= {"epochs": 60, "batch_size": 8, "eval_steps": None, "save_steps": 100000, "logging_steps": 20}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    for stage in ("download", "tokenize", "train", "merge"):
        run(["python", "-m", f"stages.{stage}"], cwd=folder, env=env_with_project(), timeout=1200)
    return folder


@pytest.fixture(scope="module")
def tool_server(tool_project):
    with serving(tool_project / "models" / "merged") as (_, url):
        yield url


def test_the_server_returns_the_models_tool_call_in_openais_shape(tool_server):
    openai = client(tool_server)
    trained = CITIES[:6]  # most of them are training records (one may be held out for validation)
    called = 0
    for city in trained:
        answer = openai.chat.completions.create(model="merged", messages=[{"role": "user", "content": f"Weather in {city}?"}],
                                                tools=[TOOL], temperature=0, max_tokens=64)  # fmt: skip
        choice = answer.choices[0]
        calls = choice.message.tool_calls or []
        if calls:
            assert choice.finish_reason == "tool_calls"
            assert calls[0].type == "function" and calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments) == {"city": city}
            assert not (choice.message.content or "").strip()  # the call is the answer, no markup left in the text
            called += 1
    assert called >= len(trained) - 1, "the trained model should call the tool for the cities it was trained on"


def test_streamed_tool_call_and_the_answer_after_the_tools_result(tool_server):
    openai = client(tool_server)
    city = CITIES[1]
    stream = openai.chat.completions.create(model="merged", messages=[{"role": "user", "content": f"Weather in {city}?"}],
                                            tools=[TOOL], temperature=0, max_tokens=64, stream=True)  # fmt: skip
    calls = [tc for chunk in stream if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": city}
    # the client sends the call back with the tool's result, as an agent loop does (arguments as JSON text)
    record = next(r for r in records() if r["messages"][0]["content"] == f"Weather in {city}?")
    result = record["messages"][2]["content"]
    messages = [{"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].id or "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
                {"role": "tool", "tool_call_id": calls[0].id or "c1", "content": result}]  # fmt: skip
    final = openai.chat.completions.create(model="merged", messages=messages, tools=[TOOL], temperature=0, max_tokens=32)
    assert final.choices[0].message.content == record["messages"][3]["content"]
    assert not final.choices[0].message.tool_calls
