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


def generated_reply(folder: Path, messages: list[dict]):
    """What the merged model writes for `messages` with the tool (greedy, `model.generate` on the prompt its chat
    template builds), split by its response template: the reply a server must return."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from stages.lib.chat import reply

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    stops = [stops] if isinstance(stops, int) else stops
    ids = list(tokenizer.apply_chat_template(messages, tools=[TOOL], add_generation_prompt=True, tokenize=True)["input_ids"])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return reply.parse(tokenizer, out[0, len(ids) :].tolist(), stops, ids)


MAX_NEW = 64


def test_the_server_returns_the_models_own_tool_call_in_openais_shape(tool_project, tool_server):
    """Non-streaming and streaming: tool_calls in OpenAI's shape (finish_reason tool_calls, arguments a JSON
    object as text, no markup left in content), equal to what the model itself writes for that prompt."""
    openai = client(tool_server)
    exact = 0
    for city in CITIES[:6]:
        messages = [{"role": "user", "content": f"Weather in {city}?"}]
        own = generated_reply(tool_project / "models" / "merged", messages)
        assert [c["function"]["name"] for c in own.tool_calls] == ["get_weather"], own  # it learned to call
        answer = openai.chat.completions.create(model="merged", messages=messages, tools=[TOOL], temperature=0,
                                                max_tokens=MAX_NEW)  # fmt: skip
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and not (choice.message.content or "").strip()
        calls = choice.message.tool_calls
        assert [(c.type, c.function.name) for c in calls] == [("function", "get_weather")]
        arguments = json.loads(calls[0].function.arguments)
        assert arguments == own.tool_calls[0]["function"]["arguments"] and set(arguments) == {"city"}
        assert arguments["city"] in CITIES  # a city of its training set: the model's own words, parsed
        exact += arguments["city"] == city
        stream = openai.chat.completions.create(model="merged", messages=messages, tools=[TOOL], temperature=0,
                                                max_tokens=MAX_NEW, stream=True)  # fmt: skip
        chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
        streamed = [tc for ch in chunks for tc in ch.delta.tool_calls or []]
        assert [json.loads(tc.function.arguments) for tc in streamed] == [arguments]
        assert chunks[-1].finish_reason == "tool_calls"
    print(f"calls with the asked city: {exact} of 6")  # the tiny model copies some; the shape is what is tested


def test_the_answer_after_the_tools_result_is_the_models_own(tool_project, tool_server):
    """An agent loop's second request: the call (arguments as JSON text, as clients send them) and the tool's
    result go back; the server answers with content, as the model writes it for that prompt."""
    openai = client(tool_server)
    record = records()[1]
    call = record["messages"][1]["tool_calls"][0]
    messages = [record["messages"][0], {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": record["messages"][2]["content"]}]  # fmt: skip
    own = generated_reply(tool_project / "models" / "merged", messages)
    final = openai.chat.completions.create(model="merged", messages=messages, tools=[TOOL], temperature=0,
                                           max_tokens=MAX_NEW)  # fmt: skip
    assert final.choices[0].message.content == own.content and own.content
    assert not final.choices[0].message.tool_calls
