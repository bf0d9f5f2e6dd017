"""Talking to the default run's tuned model: `python -m stages.serve` (transformers serve behind the request
checks) and `python -m stages.chat`, against `model.generate` on the training prompt.

The server runs for real on 127.0.0.1 (a free port) and is spoken to with the `openai` client, as a user would.
What it answers must be what `model.generate` gives for the training prompt (greedy, same cap), streaming or not;
the ids its model is given must be the training prompt's (read where they take effect, inside the server);
a bad request must get OpenAI's error JSON, not a traceback, and the server must answer the next request.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import env_with_project

MAX_NEW = 24  # new tokens per answer: the toy answers are shorter, so every one ends at its stop token
ERROR_KEYS = {"message", "type", "param", "code"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(default_run) -> Path:
    """A project folder holding the default run's outputs (models/merged, models/base, models/adapter, ...)."""
    return default_run.outputs


@pytest.fixture(scope="module")
def reference(project):
    """models/merged as transformers loads it, its stop tokens and the validation rows (training prompt ids)."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = project / "models" / "merged"
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    rows = load_from_disk(str(project / "data" / "tokenized"))["validation"].to_list()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(folder), "rows": rows[:6],
            "stops": [stops] if isinstance(stops, int) else stops}  # fmt: skip


def generated(reference, ids: list[int]) -> str:
    """What `model.generate` answers to prompt `ids`: greedy, at most MAX_NEW tokens, up to a stop token, decoded
    without special tokens (as a server returns it)."""
    import torch

    tokenizer = reference["tokenizer"]
    with torch.no_grad():
        out = reference["model"].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                          do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=reference["stops"],
                                          pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    assert set(new) & set(reference["stops"]), "the answer reached MAX_NEW tokens: raise it"
    return tokenizer.decode(new, skip_special_tokens=True)


def training_prompt(row) -> list[int]:
    return row["input_ids"][: row["prompt_length"]]


@contextmanager
def serving(folder: Path, host: str = "127.0.0.1", api_key: str | None = None):
    """stages.serve's server on `folder`, in this process (so that a test can read what its model is given), on a
    free port of `host` (reached at 127.0.0.1), up and answering /health: (the Pinned server, its base URL)."""
    import httpx

    from stages.lib.serve.server import Pinned

    port = free_port()
    pinned = Pinned(folder, host, port, device="cpu", api_key=api_key)
    pinned.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        yield pinned, url
    finally:
        pinned.stop()


@pytest.fixture(scope="module")
def server(project):
    """The server on the default run's models/merged."""
    with serving(project / "models" / "merged") as running:
        yield running


def wait_until_healthy(proc, port: int, seconds: float = 120) -> None:
    """Wait until the server command `proc` answers GET /health on `port`; fail if it exits or takes longer."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"the server did not start in {seconds:.0f} s"
            time.sleep(0.2)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_the_server_answers_as_generate_on_the_training_prompt(server, reference):
    pinned, url = server
    openai = client(url)
    listed = [m.id for m in openai.models.list().data]
    assert listed == [str(pinned.served.name)]
    # the ids the server's model is given, read inside the server: its model object, as transformers serve holds it
    manager = pinned.serve._model_manager
    model, _ = manager.load_model_and_processor(manager.process_model_name(listed[0]))
    given, original = [], model.generate

    def recording(*args, **kwargs):
        given.append(kwargs["input_ids"][0].tolist())
        return original(*args, **kwargs)

    model.generate = recording
    try:
        for k, row in enumerate(reference["rows"]):
            messages = row["messages"][:-1]
            expected = generated(reference, training_prompt(row))
            name = listed[0] if k % 2 else "merged"  # the listed name, or the folder's name
            answer = openai.chat.completions.create(model=name, messages=messages, max_tokens=MAX_NEW, temperature=0)
            assert answer.choices[0].message.content == expected
            assert answer.choices[0].finish_reason == "stop"
            assert answer.usage.prompt_tokens == row["prompt_length"]
            stream = openai.chat.completions.create(model=name, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                                    stream=True)  # fmt: skip
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
            assert given[-2:] == [training_prompt(row)] * 2, "the server's prompt is not the training prompt"
    finally:
        model.generate = original
    assert len(given) == 2 * len(reference["rows"])


def test_the_server_answers_as_eval_recorded(server, reference, project):
    """eval's generations (batched, left-padded) and the server's (one at a time) are the same answers."""
    _, url = server
    recorded = [json.loads(line) for line in (project / "eval" / "generations.jsonl").read_text().splitlines()]
    openai = client(url)
    for row, record in zip(reference["rows"], recorded):
        answer = openai.chat.completions.create(model="merged", messages=row["messages"][:-1], temperature=0)
        assert answer.choices[0].message.content.strip() == record["tuned"]


def error_of(response, status: int) -> dict:
    """The OpenAI error object of a refused request (and nothing else in the body)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, reference):
    import httpx
    import openai as openai_errors

    pinned, url = server
    openai = client(url)
    chat = f"{url}/v1/chat/completions"
    row = reference["rows"][0]
    good = {"model": "merged", "messages": row["messages"][:-1], "max_tokens": MAX_NEW, "temperature": 0}
    context = reference["model"].config.max_position_embeddings
    room = context - row["prompt_length"]

    with pytest.raises(openai_errors.NotFoundError) as caught:
        openai.chat.completions.create(**good | {"model": "gpt-4o"})
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    for change, param, code in [
        ({"messages": []}, "messages", None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages", None),  # a role the chat template refuses
        ({"messages": [{"role": "user"}]}, "messages[0].content", None),
        ({"max_tokens": 10**9}, "max_tokens", "invalid_value"),
        ({"max_tokens": room + 1}, "max_tokens", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"temperature": "hot"}, "temperature", None),
        ({"frequency_penalty": -1}, "frequency_penalty", "unsupported_parameter"),
        ({"logit_bias": {"5": 1}}, "logit_bias", "unsupported_parameter"),
        ({"tools": "nope"}, "tools", None),  # not a 500 from the chat template
        ({"stop": [".", ""]}, "stop", None),  # an empty stop would end every reply at once
        ({"stop": list("abcde")}, "stop", None),  # OpenAI takes at most 4
        ({"stop": "x" * 1001}, "stop", None),  # a reply is searched for it piece by piece
        ({"messages": [{"role": "user", "content": "词 " * context}]}, "messages", "context_length_exceeded"),
        # so long that no tokenizing fits it: refused before the template renders it (megabytes take seconds there)
        ({"messages": [{"role": "user", "content": "x" * (4 * pinned.served.token_chars * context + 1)}]}, "messages",
         "context_length_exceeded"),
    ]:
        error = error_of(httpx.post(chat, json=good | change, timeout=60), 400)
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), change
        assert "\n" not in error["message"] and "Traceback" not in error["message"]
    with pytest.raises(openai_errors.BadRequestError) as caught:
        openai.chat.completions.create(**good | {"messages": []})
    assert caught.value.param == "messages"
    assert error_of(httpx.post(chat, content=b"{not json", timeout=60), 400)["param"] is None
    surrogate = json.dumps(good | {"stop": "\ud800"}).encode()  # JSON's escape of a lone surrogate: not text
    assert "not valid Unicode" in error_of(httpx.post(chat, content=surrogate, timeout=60), 400)["message"]
    assert error_of(httpx.post(chat, json=good | {"frobnicate": 1}, timeout=60), 400)["type"] == "invalid_request_error"
    assert error_of(httpx.post(f"{url}/load_model", json={"model": "gpt2"}, timeout=60), 404)["code"] == "not_found"
    assert error_of(httpx.get(chat, timeout=60), 405)["code"] == "method_not_allowed"
    # temperature above 0 samples (transformers serve alone decoded greedily whenever generation_config.json is silent)
    sampled = {openai.chat.completions.create(**good | {"temperature": 2.0, "seed": seed}).choices[0].message.content
               for seed in range(6)}  # fmt: skip
    assert len(sampled) > 1, sampled
    # the whole room the context leaves is accepted; with no max_tokens the server stops at the context too
    expected = generated(reference, training_prompt(row))
    for change in ({"max_tokens": room}, {"max_tokens": None}, {"stop": []}, {"temperature": 1e-40}):
        answer = openai.chat.completions.create(**good | change)
        assert answer.choices[0].message.content == expected


def test_a_stop_string_ends_the_reply_before_it_and_a_stream_ends_with_done(server, reference):
    """OpenAI's `stop`: the reply ends before the stop text (transformers serve alone returns it), streaming or
    not; a stop the reply never completes leaves it whole; the event stream ends with `data: [DONE]`."""
    import httpx

    _, url = server
    openai = client(url)
    for row in reference["rows"][:3]:
        expected = generated(reference, training_prompt(row))
        middle = len(expected) // 2
        stop = expected[middle : middle + 2]  # two characters inside the answer, maybe inside one token
        cases = [([stop, "\x00never"], expected[: expected.find(stop)]),
                 ([expected[-2:] + "\x00"], expected)]  # its start is held back, then given at the finish
        for stops, want in cases:
            request = {"model": "merged", "messages": row["messages"][:-1], "max_tokens": MAX_NEW, "temperature": 0,
                       "stop": stops}  # fmt: skip
            answer = openai.chat.completions.create(**request)
            assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (want, "stop"), stops
            stream = openai.chat.completions.create(**request, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want, stops
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request | {"stream": True}, timeout=60) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    assert all(e.startswith("data: ") for e in events) and json.loads(events[-2][6:])["choices"][0]["finish_reason"]


def test_stop_cutter_gives_the_same_text_however_the_reply_is_split():
    import random

    from stages.lib.serve.replies import StopCutter, cut

    text = "ab abc abcd 答案是：甲。abcde"
    rng = random.Random(0)
    for stops in (["abcd"], ["cde", "：甲"], ["zz"], ["e"], ["abcde", "c a"]):
        whole = cut(text, stops)
        assert whole == text[: min([text.find(s) for s in stops if s in text], default=len(text))]
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 8)))
            pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
            cutter = StopCutter(stops)
            assert "".join(cutter.feed(p) for p in pieces) + cutter.flush() == whole, (stops, pieces)


def serve_command(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.serve", *args], cwd=cwd, env=env_with_project(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_serve_command_serves_models_merged_until_ctrl_c(project, reference, tmp_path):
    import httpx

    missing = serve_command(tmp_path)
    assert missing.wait(timeout=60) == 1
    assert missing.stdout.read().strip().splitlines() == [
        "error: models/merged holds no model (no config.json): `dvc repro` builds it (the merge stage writes it), "
        "or name another folder with --model"]  # fmt: skip

    # a folder whose weights were deleted, a device that does not exist: one line each, before anything loads
    weightless = tmp_path / "merged"
    weightless.mkdir()
    for f in (project / "models" / "merged").iterdir():
        if f.suffix != ".safetensors":
            (weightless / f.name).symlink_to(f)
    for args, line in [(("--model", str(weightless)), f"error: {weightless} is damaged (config.json but no "
                        f"*.safetensors weights): restore it with `dvc checkout {weightless}`"),
                       (("--device", "banana"), "error: --device banana: not a device; use auto, cpu, cuda or cuda:N")]:
        refused = serve_command(project, *args)
        assert refused.wait(timeout=120) == 1
        lines = refused.stdout.read().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), lines

    port = free_port()
    proc = serve_command(project, "--port", str(port))
    try:
        wait_until_healthy(proc, port)
        openai = client(f"http://127.0.0.1:{port}")
        assert [m.id for m in openai.models.list().data] == ["models/merged"]
        row = reference["rows"][1]
        stream = openai.chat.completions.create(model="models/merged", messages=row["messages"][:-1],
                                                max_tokens=MAX_NEW, temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == generated(
            reference, training_prompt(row))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    log = proc.stdout.read()
    assert "Traceback" not in log, log
    assert f"serve: models/merged at http://127.0.0.1:{port}/v1" in log


def chat_command(cwd: Path, turns: list[str], *args: str) -> list[str]:
    """Standard output of `python -m stages.chat` given `turns` on standard input (a pipe), split into lines."""
    text = "".join(turn.replace("\n", "\\\n") + "\n" for turn in turns)  # a line break inside a turn: backslash
    proc = subprocess.run([sys.executable, "-m", "stages.chat", "--max-new-tokens", str(MAX_NEW), *args], cwd=cwd,
                          env=env_with_project(), input=text, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout.splitlines()


def test_chat_command_answers_as_generate_and_keeps_the_conversation(project, reference):
    tokenizer = reference["tokenizer"]
    rows = reference["rows"]
    first, second, third = (row["messages"][0]["content"] for row in rows[:3])
    turns = [first, second, "/reset", third, "/exit", "never read"]
    # turn 1 and the turn after /reset: a conversation of one message, i.e. the training prompt
    one = generated(reference, training_prompt(rows[0]))
    # turn 2: the conversation so far (the first answer, stripped as eval keeps it) + the new message
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": one.strip()},
               {"role": "user", "content": second}]  # fmt: skip
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    two = generated(reference, list(ids))
    three = generated(reference, training_prompt(rows[2]))
    assert chat_command(project, turns) == [one, two, three]
    # base + adapter, unmerged (PEFT): the same answers as the merged model
    assert chat_command(project, [first, "/reset", third], "--adapter", "models/adapter") == [one, three]


def test_piped_chat_keeps_answers_in_step_with_turns_when_one_is_refused(project, reference):
    """A turn the model cannot take (longer than its context) leaves an empty answer line, the next turn is answered
    on the next line, and the command exits 1 saying how many turns got no answer."""
    row = reference["rows"][0]
    first = row["messages"][0]["content"]
    text = "字" * 3000 + "\n" + first.replace("\n", "\\\n") + "\n"  # a line break inside a turn: backslash
    proc = subprocess.run([sys.executable, "-m", "stages.chat", "--max-new-tokens", str(MAX_NEW)], cwd=project,
                          env=env_with_project(), input=text, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == ["", generated(reference, training_prompt(row))]
    assert "error: 1 of 2 turns got no answer" in proc.stderr and "Traceback" not in proc.stderr
