"""The whole pipeline with real DVC in a fresh git clone: repro, param edits, experiments, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (ROOT, assert_merged_prompts_are_the_training_prompts, clone, dvc, edit_params, env_with_project,
                      run)


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def out_hash(repo: Path, stage: str, path: str) -> str:
    return next(o["md5"] for o in lock(repo)[stage]["outs"] if o["path"] == path)


@pytest.fixture(scope="module")
def repo(default_run) -> Path:
    """The clone the default run was made in (conftest's session fixture; its .audit/ lists what each stage read)."""
    return default_run.repo


def test_fresh_clone_repro_trains_a_model_that_beats_the_base(repo):
    scores = json.loads((repo / "metrics" / "eval.json").read_text())
    base, tuned = scores["base"], scores["tuned"]
    assert tuned["loss"] < base["loss"] - 1.0
    assert tuned["exact_match"] > base["exact_match"] or tuned["rouge_l"] > base["rouge_l"] + 0.2

    from safetensors.torch import load_file

    weights = load_file(repo / "models" / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: non-zero means it trained
    targets = json.loads((repo / "models" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets)  # PEFT writes a set's order, which changes the adapter's hash run to run
    assert (repo / "models" / "merged" / "model.safetensors").exists()
    assert json.loads((repo / "metrics" / "merge.json").read_text())["max_abs_logit_diff"] < 1e-3
    assert (repo / "dvclive" / "train" / "plots" / "metrics" / "train" / "loss.tsv").exists()
    assert len((repo / "eval" / "generations.jsonl").read_text().splitlines()) == scores["samples"]
    assert dvc("status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."


def test_dvc_plots_draws_the_intended_charts_only(repo):
    """`dvc plots show` as a user runs it: eight charts, none of them a single point; the loss chart has both curves."""
    shown = json.loads(dvc("plots", "show", "--json", cwd=repo).stdout)["data"]
    assert list(shown) == [
        "Answer-token loss, training and validation",
        "Learning rate",
        "Gradient norm (before clipping)",
        "Training tokens per second (all ranks; logs/, not versioned)",
        "Eval scores, base vs tuned",
        "Eval BLEU and chrF, base vs tuned",
        "Multiple-choice accuracy per benchmark, base vs tuned",
        "Eval answer loss, base vs tuned",
    ]
    for title, (chart,) in shown.items():
        values = chart["content"]["data"]["values"]
        assert len(values) >= 2, title
    curves = {v["filename"] for v in shown["Answer-token loss, training and validation"][0]["content"]["data"]["values"]}
    assert curves == {"train/loss.tsv", "eval/loss.tsv"}
    bars = {(v["metric"], v["model"]) for v in shown["Eval scores, base vs tuned"][0]["content"]["data"]["values"]}
    assert bars == {(m, model) for m in ("exact_match", "rouge_l", "cut_by_cap") for model in ("base", "tuned")}
    bars = {(v["metric"], v["model"]) for v in shown["Multiple-choice accuracy per benchmark, base vs tuned"][0]["content"]["data"]["values"]}
    assert bars == {(m, model) for m in ("toy-choice", "all") for model in ("base", "tuned")}
    logged = {p.relative_to(repo / "dvclive" / "train" / "plots" / "metrics").as_posix()
              for p in (repo / "dvclive" / "train" / "plots" / "metrics").rglob("*.tsv")}  # fmt: skip
    assert logged == {"train/loss.tsv", "eval/loss.tsv", "learning_rate.tsv", "grad_norm.tsv"}  # no timings: those
    assert (repo / "logs" / "tokens_per_s.tsv").is_file()  # change run to run, and dvc.lock holds reproducible ones
    assert [p.name for p in (repo / "models" / "checkpoints").iterdir()] == ["ABOUT.txt"]  # emptied once complete


def rendered_charts(page: Path) -> int:
    """Charts that Vega drew when headless Chromium opened `page` with every network request refused."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if chromium is None:
        pytest.skip("no Chromium here (apt install chromium) to render the page")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    return dom.count('class="marks"')  # the canvas Vega draws each chart on


def test_plots_render_with_no_network(repo, tmp_path):
    """DVC's own page loads Vega from a CDN and stays blank offline; `python -m stages.plots` inlines it."""
    dvc("plots", "show", "-o", str(tmp_path / "dvc"), cwd=repo)
    run([sys.executable, "-m", "stages.plots", "show", "-o", str(tmp_path / "ours")], cwd=repo)
    ours = tmp_path / "ours" / "index.html"
    assert "<script src=" not in ours.read_text() and "<script src=" in (tmp_path / "dvc" / "index.html").read_text()
    assert rendered_charts(tmp_path / "dvc" / "index.html") == 0
    assert rendered_charts(ours) == 8
    dvc("plots", "show", "-o", str(tmp_path / "later"), cwd=repo)  # the local config keeps plain `dvc plots` offline
    assert "<script src=" not in (tmp_path / "later" / "index.html").read_text()


def files_read_by_stage(repo: Path) -> dict[str, set[str]]:
    """Per stage: the project files its processes opened for reading or imported (empty files aside)."""
    out: dict[str, set[str]] = {}
    for log in (repo / ".audit").glob("*.json"):
        record = json.loads(log.read_text())
        main = record["main"] or ""
        if not main.startswith("stages."):
            continue
        for name in record["read"] + record["modules"]:
            path = Path(name)
            if path.parent.name == "__pycache__":
                path = path.parent.parent / (path.name.split(".")[0] + ".py")
            if not path.is_relative_to(repo) or not path.is_file() or not path.stat().st_size:
                continue  # outside the project, a temp file since removed, or an empty package marker
            rel = path.relative_to(repo)
            if rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info") or rel.name == "params.yaml":
                continue
            if rel.as_posix() == "dvc.yaml":  # the stage's own entry (its declared inputs, checked before the swap)
                continue
            out.setdefault(main.split(".")[1], set()).add(rel.as_posix())
    return out


def test_every_file_a_stage_reads_is_declared(repo):
    """A file a stage reads but dvc.yaml does not list would leave stale outputs that `dvc status` calls fresh."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    read = files_read_by_stage(repo)
    assert set(read) == set(stages)
    for stage, files in read.items():
        spec = stages[stage]
        declared = [d.replace("${model.recipe}", params["model"]["recipe"]) for d in spec["deps"]]
        declared += [next(iter(o)) if isinstance(o, dict) else o for k in ("outs", "metrics", "plots") for o in spec.get(k, [])]
        missing = sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in declared))
        assert not missing, f"stage {stage} reads files dvc.yaml does not list: {missing}"


def test_merged_model_ships_the_training_prompt_format(repo):
    assert_merged_prompts_are_the_training_prompts(repo)
    stats = json.loads((repo / "metrics" / "tokenize.json").read_text())
    assert stats["prompt_mismatch"] == 0 and stats["trained_tokens"] < stats["tokens"] / 3  # answers only


def test_a_train_edit_reruns_train_merge_eval_only_as_an_experiment(repo):
    """A train param edit makes train stale, nothing upstream; `dvc exp run` runs train, merge and eval only and
    the experiment shows its param and metrics, without DVCLive's dump of every TrainingArguments field."""
    edit_params(repo, **{"train.learning_rate": 0.002, "train.epochs": 2})
    try:
        # DVC reports the first stale stage; merge and eval follow once the adapter it writes has changed
        stale = json.loads(dvc("status", "--json", cwd=repo).stdout)
        assert set(stale) == {"train"}
        assert stale["train"] == [{"changed deps": {"params.yaml": {"train": "modified"}}}]
        out = dvc("exp", "run", "-n", "lr-low", cwd=repo).stdout
        assert "Stage 'download' didn't change, skipping" in out
        assert "Stage 'tokenize' didn't change, skipping" in out
        for stage in ("train", "merge", "eval"):
            assert f"Running stage '{stage}'" in out
    finally:
        run(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "metrics", "dvclive", "eval"], cwd=repo)
        dvc("checkout", "--force", cwd=repo)
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo).stdout)
    baseline = next(b for b in shown if b["rev"] != "workspace")
    assert baseline["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.005
    assert "metrics/tuned.json" in baseline["data"]["metrics"]
    exp = next(e for e in baseline["experiments"] if e["name"] == "lr-low")["revs"][0]["data"]
    assert exp["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.002
    assert exp["metrics"]["metrics/tuned.json"]["data"].keys() == {"loss", "exact_match", "bleu", "accuracy"}
    assert set(exp["params"]) == {"params.yaml"}
    table = dvc("exp", "show", "--no-pager", "--csv", cwd=repo).stdout
    assert "lr-low" in table and "gradient_accumulation_steps" not in table
    # only quality is a DVC metric, tuned scores first; timings live in metrics/train_speed.json
    assert list(exp["metrics"]) == ["metrics/tuned.json", "metrics/base.json", "metrics/train.json"]
    assert exp["metrics"]["metrics/train.json"]["data"].keys() == {"train_loss", "validation_loss"}
    assert not {"tokens_per_s", "step_time_s", "runtime", "gib"} & set(json.dumps(exp["metrics"]).replace('"', " ").split())
    report = run([sys.executable, "-m", "stages.report", "--exps"], cwd=repo).stdout
    row = next(line for line in report.splitlines() if "lr-low" in line).split()
    assert "0.002" in row and "2" in row  # the changed learning_rate and epochs, in the experiment's row
    assert "learning_rate" in report and "epochs" in report


@pytest.mark.slow  # two more trainings (about 35 s); run with -m slow after changing train or its outputs
def test_training_twice_gives_the_same_adapter_hash(repo):
    """Versioned outputs are deterministic: the same params and data give the same dvc.lock entry for train, every
    output's hash included (timings change run to run: metrics/train_speed.json and logs/ are no DVC outputs)."""
    edit_params(repo, **{"train.max_steps": 20})
    try:
        hashes = []
        for _ in range(2):
            dvc("repro", "--force", "--single-item", "train", cwd=repo)  # --force: really train, not the run cache
            hashes.append(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"])
            speed = json.loads((repo / "metrics" / "train_speed.json").read_text())
            assert speed["tokens_per_s"] > 0 and "peak_gib_train_per_rank" not in speed  # no GPU: no memory figure
        assert hashes[0] == hashes[1]
        assert not {"tokens_per_s", "step_time_s"} & set(json.loads((repo / "models" / "adapter" / "train_config.json").read_text()))
    finally:
        run(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock", "metrics", "dvclive"], cwd=repo)
        dvc("checkout", "--force", cwd=repo)


def test_a_misspelt_key_fails_fast_and_keeps_every_output(repo):
    adapter_before = (repo / "models" / "adapter" / "adapter_model.safetensors").read_bytes()
    lock_before = (repo / "dvc.lock").read_text()
    edit_params(repo, **{"train.lerning_rate": 0.1})
    try:
        proc = dvc("repro", cwd=repo, check=False)
        assert proc.returncode != 0
        assert "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?" in proc.stdout + proc.stderr
        assert (repo / "models" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
        assert (repo / "dvc.lock").read_text() == lock_before
    finally:
        run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=repo)
    assert dvc("status", cwd=repo).stdout.strip() == "Data and pipelines are up to date."


def test_two_fresh_runs_give_identical_data_hashes(repo, tmp_path):
    other = clone(tmp_path / "again")
    dvc("repro", "tokenize", cwd=other)
    for stage, path in [("download", "data/raw"), ("download", "models/base"), ("tokenize", "data/tokenized")]:
        assert out_hash(other, stage, path) == out_hash(repo, stage, path), path


@pytest.mark.slow  # a whole pipeline with a 150k-token vocabulary (about 2 min); mixing is unit-tested in test_data
@pytest.mark.shared_data
def test_a_belle_style_mixture_with_the_qwen2_tokenizer(shared_data, tmp_path):
    """Real Chinese alpaca records exported BELLE-style (question/std_answer, JSON Lines in a file named .json) mixed
    with a ShareGPT set that carries a top-level system prompt, mapped by params alone, through every stage with a
    tiny random Qwen2 on the real Qwen2 tokenizer (model.tokenizer)."""
    import shutil

    repo = clone(tmp_path / "zh")
    records = json.loads((shared_data / "instruct" / "alpaca_zh_demo.json").read_text())[:120]
    belle = "".join(json.dumps({"question": f"{r['instruction']}\n{r['input']}".strip(), "std_answer": r["output"],
                                "id": i}, ensure_ascii=False) + "\n" for i, r in enumerate(records))  # fmt: skip
    (repo / "data" / "sources" / "belle.json").write_text(belle, encoding="utf-8")
    sharegpt = [{"system": "你是翻译。", "conversations": [{"from": "human", "value": r["instruction"]},
                                                        {"from": "gpt", "value": r["output"]}]}
                for r in json.loads((shared_data / "instruct" / "alpaca_en_demo.json").read_text())[:40]]  # fmt: skip
    (repo / "data" / "sources" / "en.json").write_text(json.dumps(sharegpt, ensure_ascii=False), encoding="utf-8")
    shutil.copytree(shared_data / "tokenizers" / "qwen2", repo / "models" / "sources" / "qwen2")
    recipe = {
        "description": "tiny random Qwen2 (test only)",
        "source": {"kind": "config", "model_type": "qwen2",
                   "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2,
                              "tie_word_embeddings": True}},
        "template": "chatml",
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "dtype": "float32",
    }  # fmt: skip
    (repo / "recipes" / "models" / "tiny-qwen2-test.yaml").write_text(yaml.safe_dump(recipe))
    edit_params(repo, **{
        "data.sources": [
            {"kind": "local", "path": "data/sources/belle.json", "columns": {"instruction": "question", "output": "std_answer"}},
            {"kind": "local", "path": "data/sources/en.json", "format": "messages", "weight": 0.5},
        ],
        "model.recipe": "tiny-qwen2-test", "model.tokenizer": "models/sources/qwen2", "tokenize.max_length": 256,
        "train.max_steps": 6, "train.batch_size": 2, "train.logging_steps": 2, "train.packing": True, "eval.max_samples": 4,
        "eval.max_new_tokens": 8,
    })  # fmt: skip
    proc = dvc("repro", cwd=repo)
    assert "belle: 120 of 120 kept, ignored columns id" in proc.stdout and "en: 40 of 40 kept, weight 0.5" in proc.stdout
    stats = json.loads((repo / "metrics" / "tokenize.json").read_text())
    belle_counts, en = stats["sources"]["belle"], stats["sources"]["en"]
    assert belle_counts["validation"] + en["validation"] == stats["validation_records"] > 0
    assert belle_counts["train"] + en["train"] == stats["train_records"]
    assert 13 <= en["train"] <= 20  # weight 0.5 of its ~36 training records
    raw = json.loads((repo / "data" / "raw" / "manifest.json").read_text())
    assert raw["validation_records"] == 16  # 10 % of the 160 distinct records
    assert any(line.startswith('{"messages": [{"content": "你是翻译。", "role": "system"}')
               for line in (repo / "data" / "raw" / "train.jsonl").read_text().splitlines())  # fmt: skip
    train_log = json.loads((repo / "dvclive" / "train" / "metrics.json").read_text())
    assert train_log["step"] == 6
    rows = (repo / "dvclive" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    losses = [float(r.split("\t")[-1]) for r in rows]
    assert losses[-1] < losses[0]
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert_merged_prompts_are_the_training_prompts(repo)


@pytest.mark.slow  # a whole pipeline (70 s); the tokenizer kind is also covered by test_train_labels/test_chat_format
@pytest.mark.shared_data
def test_pipeline_on_a_sentencepiece_model_without_a_pad_token(shared_data, tmp_path):
    """stories260K: a real tiny Llama whose SentencePiece tokenizer adds BOS, has no pad token and reads ChatML's
    <|im_end|> as plain text. Every stage runs (eval used to crash on the missing pad), answers end in EOS."""
    import shutil

    repo = clone(tmp_path / "sp")
    shutil.copytree(shared_data / "models" / "stories260K", repo / "models" / "sources" / "stories260K")
    edit_params(repo, **{"model.path": "models/sources/stories260K", "tokenize.template": "chatml",
                         "train.max_steps": 30, "train.learning_rate": 0.01, "eval.max_samples": 8,
                         "eval.max_new_tokens": 8})  # fmt: skip
    proc = dvc("repro", cwd=repo)
    assert "end marker '<|im_end|>' is not one special token of this tokenizer: answers end with '</s>'" in proc.stdout
    assert_merged_prompts_are_the_training_prompts(repo)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo / "models" / "merged")
    assert tokenizer.pad_token == "<unk>"
    for line in (repo / "eval" / "generations.jsonl").read_text().splitlines():
        assert "im_end" not in json.loads(line)["tuned"]
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]


@pytest.mark.parametrize("stage", ["merge", "train"])
def test_a_write_the_machine_refuses_is_one_line_and_keeps_the_outputs(default_run, tmp_path, stage):
    """A file size limit (ulimit -f) plays a full disk, which a test cannot fill: safetensors' save in merge (a Rust
    io error) and torch's checkpoint writer in train fail; the stage says so in one line and keeps its outputs."""
    import resource
    import signal

    repo = tmp_path / "repo"
    shutil.copytree(default_run.repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    if stage == "train":
        edit_params(repo, **{"train.max_steps": 4, "train.save_steps": 2})
    kept = {p: p.read_bytes() for p in (repo / "models").rglob("*") if p.is_file() and "checkpoints" not in p.parts}

    size = 1 << 20 if stage == "merge" else 200 << 10  # below the merged weights (5 MB), the adapter (330 kB)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG instead of killing

    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env_with_project(),
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: a file grew past this process's file size limit"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in kept} == kept


def test_full_fine_tuning_trains_and_merges(default_run, tmp_path):
    """train.method full: every weight trains, models/adapter holds the whole model, merge takes it as it is."""
    repo = tmp_path / "repo"
    shutil.copytree(default_run.repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    edit_params(repo, **{"train.method": "full", "train.max_steps": 2, "train.dtype": "float32"})
    for stage in ("train", "merge"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env_with_project(),
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"
    assert (repo / "models" / "adapter" / "model.safetensors").is_file()
    assert not (repo / "models" / "adapter" / "adapter_config.json").exists()
    assert (repo / "models" / "merged" / "model.safetensors").is_file()


def test_the_readme_share_row_pushes_and_another_clone_pulls_the_same_outputs(repo, tmp_path):
    """The README's folder remote, as written: `dvc remote add -d store <folder> && dvc push`, then a fresh clone
    elsewhere pulls the adapter and merged model dvc.lock names. The S3 extra is declared (its push needs keys)."""
    import tomllib

    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| share results |"))
    assert "`dvc remote add -d store /mnt/team/dvc-store && dvc push`" in row and "pip install -e '.[s3]'" in row
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("dvc-s3") for d in extras["s3"])
    store = tmp_path / "dvc-store"
    try:
        dvc("remote", "add", "-d", "store", str(store), cwd=repo)
        dvc("push", cwd=repo)
    finally:
        run(["git", "checkout", "HEAD", "--", ".dvc/config"], cwd=repo)
    other = clone_of(repo, tmp_path / "other")
    dvc("remote", "add", "-d", "store", str(store), cwd=other)
    dvc("pull", cwd=other)
    for path in ("models/adapter/adapter_model.safetensors", "models/merged/config.json", "data/tokenized"):
        assert (other / path).exists(), path
    assert not json.loads(dvc("status", "--json", cwd=other).stdout)  # everything as dvc.lock says


def clone_of(repo: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(repo), str(dest)], cwd=repo)
    return dest
