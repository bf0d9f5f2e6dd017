"""Eval's scores: multiple-choice accuracy through lm-evaluation-harness, BLEU/chrF, the generation cap.

The CMMLU check recomputes lm-eval's answers by hand: the chat-template prompt a server builds (worked examples as
earlier turns), one forward pass per option letter, the most likely letter wins.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import default_params


def tiny_model(folder: Path, tokenizer_dir: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         initializer_range=0.5)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def hand_choice(model, tokenizer, shots: list[dict], question: dict) -> int:
    import torch

    def turn(row):
        return (f"{row['Question'].strip()}\n" + "".join(f"{c}. {row[c]}\n" for c in "ABCD") + "答案：")

    messages = []
    for row in shots:
        messages += [{"role": "user", "content": turn(row)}, {"role": "assistant", "content": row["Answer"]}]
    messages.append({"role": "user", "content": turn(question)})
    context = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    scores = []
    for letter in "ABCD":
        ids = tokenizer(context + letter, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        scores.append(sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))))
    return max(range(4), key=scores.__getitem__)


@pytest.mark.shared_data
def test_cmmlu_few_shot_accuracy_matches_a_hand_computed_ranking(shared_data):
    import csv

    from stages.lib.eval import benchmarks

    cmmlu = shared_data / "eval" / "cmmlu"
    test, dev = cmmlu / "test" / "computer_science.csv", cmmlu / "dev" / "computer_science.csv"
    assert benchmarks.detect_layout(test).name == "cmmlu" and benchmarks.check_answers(test, benchmarks.LAYOUTS["cmmlu"]) == 204
    model, tokenizer = tiny_model(Path("unused"), shared_data / "tokenizers" / "qwen2")
    task = benchmarks.task_config("cmmlu-cs", test, dev, shots=2, limit=3)
    result = benchmarks.accuracy(model, tokenizer, [task], batch_size=4)
    with open(dev, encoding="utf-8") as f:
        shots = list(csv.DictReader(f))[:2]
    with open(test, encoding="utf-8") as f:
        questions = list(csv.DictReader(f))[:3]
    expected = [hand_choice(model, tokenizer, shots, q) for q in questions]
    assert result["cmmlu-cs"]["choices"] == expected
    right = sum("ABCD"[c] == q["Answer"] for c, q in zip(expected, questions))
    assert result["cmmlu-cs"]["accuracy"] == pytest.approx(right / 3) and result["overall"]["questions"] == 3


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_layouts_are_recognised_and_bad_files_named(tmp_path: Path):
    from stages.lib.eval import benchmarks

    q = ["1+1?", "1", "2", "3", "4"]
    cmmlu = write_csv(tmp_path / "a.csv", [["", "Question", "A", "B", "C", "D", "Answer"], ["0", *q, "B"]])
    ceval = write_csv(tmp_path / "b.csv", [["id", "question", "A", "B", "C", "D", "answer", "explanation"], ["0", *q, "B", ""]])
    mmlu = write_csv(tmp_path / "c.csv", [[*q, "B"], [*q, "C"]])
    assert [benchmarks.detect_layout(p).name for p in (cmmlu, ceval, mmlu)] == ["cmmlu", "ceval", "mmlu"]
    assert benchmarks.check_answers(mmlu, benchmarks.LAYOUTS["mmlu"]) == 2
    other = write_csv(tmp_path / "d.csv", [["q", "a"], ["x", "y"]])
    with pytest.raises(benchmarks.BenchmarkError, match="is none of the layouts"):
        benchmarks.detect_layout(other)
    hidden = write_csv(tmp_path / "e.csv", [["id", "question", "A", "B", "C", "D", "answer"], ["0", *q, ""]])
    with pytest.raises(benchmarks.BenchmarkError, match=r"e.csv line 2: answer '' is not one of A, B, C, D"):
        benchmarks.check_answers(hidden, benchmarks.LAYOUTS["ceval"])
    test, dev = benchmarks.write_builtin("toy-choice", 42, tmp_path / "toy")
    assert benchmarks.detect_layout(test).name == "cmmlu" and benchmarks.check_answers(test, benchmarks.LAYOUTS["cmmlu"]) == 40


def test_benchmark_params_are_checked_before_models_load(tmp_path: Path, monkeypatch):
    from stages.eval import benchmark_tasks
    from stages.lib.core.errors import UserError
    from stages.lib.core.params import ParamsError, load_params

    monkeypatch.chdir(tmp_path)
    raw = default_params()

    def params_with(*benchmarks):
        raw["eval"]["benchmarks"] = list(benchmarks)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        return load_params()

    for entry, message in [
        ({"name": "x", "test": "elsewhere/t.csv"}, "must be a file under data/benchmarks/"),
        ({"name": "x", "test": "data/benchmarks/t.csv", "shots": 3}, "shots: 3 needs dev"),
        ({"name": "x"}, "give one of builtin, test .* or hub"),
        ({"name": "x", "hub": {"repo": "org/set", "revision": "main", "test": "t.csv"}}, "40 hex digits"),
        ({"name": "x", "hub": {"repo": "org/set", "revision": "a" * 40, "test": "t.json"}}, "hub.test"),
    ]:
        with pytest.raises(ParamsError, match=message):
            params_with(entry)
    with pytest.raises(ParamsError, match="name x is used twice"):
        params_with({"name": "x", "builtin": "toy-choice"}, {"name": "x", "builtin": "toy-choice"})
    with pytest.raises(ParamsError, match=r"eval.benchmarks.1: builtin: toy-choice brings its own worked examples"):
        params_with({"name": "x", "builtin": "toy-choice"}, {"name": "y", "builtin": "toy-choice", "dev": "data/benchmarks/d.csv"})
    with pytest.raises(ParamsError, match="eval.benchmarks.0.name"):
        params_with({"name": "cmmlu.cs", "builtin": "toy-choice"})  # a dot would nest the metric key
    with pytest.raises(UserError, match=r"eval.benchmarks\[0\] \(cs\): data/benchmarks/t.csv does not exist"):
        benchmark_tasks(params_with({"name": "cs", "test": "data/benchmarks/t.csv"}), tmp_path)
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(tmp_path / "data" / "benchmarks" / "t.csv", [header, ["0", "q", "1", "2", "3", "4", "E"]])
    with pytest.raises(UserError, match=r"\(cs\): data/benchmarks/t.csv line 2: answer 'E' is not one of A, B, C, D$"):
        benchmark_tasks(params_with({"name": "cs", "test": "data/benchmarks/t.csv"}), tmp_path)
    write_csv(tmp_path / "data" / "benchmarks" / "good.csv", [header, ["0", "q", "1", "2", "3", "4", "b"]])
    assert benchmark_tasks(params_with({"name": "cs", "test": "data/benchmarks/good.csv"}), tmp_path)  # lower case
    write_csv(tmp_path / "data" / "benchmarks" / "dev2.csv", [header] + [["0", "q", "1", "2", "3", "4", "A"]] * 2)
    write_csv(tmp_path / "data" / "benchmarks" / "mmlu.csv", [["q", "1", "2", "3", "4", "A"]] * 5)
    (tmp_path / "data" / "benchmarks" / "gbk.csv").write_bytes(",Question,A,B,C,D,Answer\n0,".encode() + "题目".encode("gbk"))
    (tmp_path / "data" / "benchmarks" / "dir.csv").mkdir()
    write_csv(tmp_path / "elsewhere.csv", [header, ["0", "q", "1", "2", "3", "4", "A"]])
    (tmp_path / "data" / "benchmarks" / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    write_csv(tmp_path / "data" / "benchmarks" / "noanswer.csv", [["id", "question", "A", "B", "C", "D"], ["0", "q", "1", "2", "3", "4"]])
    for entry, message in [
        ({"dev": "data/benchmarks/dev2.csv", "shots": 3}, "dev2.csv has 2 worked examples, shots asks for 3: lower shots"),
        ({"dev": "data/benchmarks/mmlu.csv", "shots": 1}, "mmlu.csv is in the mmlu layout and data/benchmarks/good.csv in the cmmlu layout"),
        ({"test": "data/benchmarks/gbk.csv"}, r"gbk.csv is not UTF-8 text \(byte \d+\): save it as UTF-8"),
        ({"test": "data/benchmarks/dir.csv"}, "dir.csv is not a file"),
        ({"test": "data/benchmarks/link.csv"}, "link.csv leads to .*elsewhere.csv, outside data/benchmarks/"),
        ({"test": "data/benchmarks/noanswer.csv"}, "has no answer column .C-Eval's test split has no answers"),
    ]:
        with pytest.raises(UserError, match=r"eval.benchmarks\[0\] \(cs\): .*" + message):
            benchmark_tasks(params_with({"name": "cs", "test": "data/benchmarks/good.csv"} | entry), tmp_path)


def test_bleu_chrf_and_the_generation_cap():
    from stages.eval import generation_caps
    from stages.lib.eval.scores import sacrebleu_scores

    same = sacrebleu_scores(["红色的猫", "red cat"], ["红色的猫", "red cat"])
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert sacrebleu_scores(["狗"], ["红色的猫"])["bleu"] < 1
    rows = [{"assistant_masks": [0, 0, 1, 1, 1]}, {"assistant_masks": [0] + [1] * 12}]
    assert generation_caps(rows, None, None)[0] == [16, 24] and generation_caps(rows, 7, None)[0] == [7, 7]


def test_hub_benchmark_files_come_from_the_pinned_revision(tmp_path: Path, monkeypatch):
    """The real hf_hub_download, offline, against a Hub cache laid out as huggingface_hub lays it out: MMLU's
    Parquet layout (question, choices, answer index) becomes the MMLU CSV layout; CSV files are read as they are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.eval import benchmark_tasks
    from stages.lib.core.errors import UserError
    from stages.lib.core.params import load_params

    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "datasets--org--mmlu" / "snapshots" / revision
    (snapshot / "astronomy").mkdir(parents=True)
    rows = {"question": ["q1", "q2", "q3"], "subject": ["astronomy"] * 3,
            "choices": [["a", "b", "c", "d"]] * 3, "answer": [0, 3, 1]}  # fmt: skip
    pq.write_table(pa.table(rows), snapshot / "astronomy" / "test-00000-of-00001.parquet")
    write_csv(snapshot / "astronomy" / "dev.csv", [["q", "1", "2", "3", "4", "B"]] * 2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    raw = default_params()
    hub = {"repo": "org/mmlu", "revision": revision, "test": "astronomy/test-00000-of-00001.parquet",
           "dev": "astronomy/dev.csv"}  # fmt: skip
    raw["eval"]["benchmarks"] = [{"name": "astronomy", "hub": hub, "shots": 2}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    scratch = tmp_path / "scratch"
    (task,) = benchmark_tasks(load_params(), scratch)
    test_csv = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert test_csv.read_text().splitlines() == ["q1,a,b,c,d,A", "q2,a,b,c,d,D", "q3,a,b,c,d,B"]
    assert task["dataset_kwargs"]["column_names"] == ["question", "A", "B", "C", "D", "answer"]  # the MMLU layout
    assert Path(task["dataset_kwargs"]["data_files"]["dev"]).parent.name == "astronomy"  # the cached CSV itself
    raw["eval"]["benchmarks"] = [{"name": "astronomy", "hub": hub | {"test": "astronomy/missing.parquet"}}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"hub benchmark org/mmlu@0123.* file astronomy/missing.parquet could not "
                                        r"be loaded: .*HF_HUB_OFFLINE is set"):  # fmt: skip
        benchmark_tasks(load_params(), scratch)
    # CMMLU as the Hub's Parquet conversion has it: no index column, and pandas' index kept at the end
    cmmlu = {"Question": ["q1", "q2"], "A": ["1", "2"], "B": ["3", "4"], "C": ["5", "6"], "D": ["7", "8"],
             "Answer": ["B", "x"], "__index_level_0__": [0, 1]}  # fmt: skip
    pq.write_table(pa.table(cmmlu), snapshot / "cmmlu.parquet")
    (snapshot / "broken.parquet").write_text("not parquet")
    bad_cells = rows | {"answer": [True, False, True]}
    pq.write_table(pa.table(bad_cells), snapshot / "bool.parquet")
    for test, message in [
        ("cmmlu.parquet", r"org/mmlu/cmmlu.parquet line 3: answer 'x' is not one of A, B, C, D$"),
        ("broken.parquet", r"org/mmlu/broken.parquet is not a readable Parquet file"),
        ("bool.parquet", r"org/mmlu/bool.parquet row 0: answer True is not an index 0-3"),
    ]:
        raw["eval"]["benchmarks"] = [{"name": "x", "hub": {"repo": "org/mmlu", "revision": revision, "test": test}}]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(UserError, match=r"eval.benchmarks\[0\] \(x\): " + message):
            benchmark_tasks(load_params(), scratch)
