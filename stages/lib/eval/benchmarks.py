"""Multiple-choice benchmarks (CMMLU, C-Eval, MMLU CSV layouts) scored by lm-evaluation-harness.

Each benchmark of params `eval.benchmarks` becomes an lm-eval task config built here (no YAML files): the question
and its four options as a user turn of the model's chat template (the prompt a server builds), k worked examples
from the dev file as earlier turns, and the option letters scored by their log-likelihood as the assistant's first
tokens (lm-eval's `multiple_choice`: the most likely letter is the model's answer). lm-eval reads the CSV files
with `datasets`; the built-in `toy-choice` set is written to a temporary folder first.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Layout:
    """Column names of one CSV layout and the answer cue that ends each question."""

    name: str
    question: str
    answer: str
    cue: str
    header: bool = True


LAYOUTS = {
    "cmmlu": Layout("cmmlu", "Question", "Answer", "答案："),  # header ",Question,A,B,C,D,Answer"
    "ceval": Layout("ceval", "question", "answer", "答案："),  # header "id,question,A,B,C,D,answer[,explanation]"
    "mmlu": Layout("mmlu", "question", "answer", "Answer:", header=False),  # no header: question,A,B,C,D,answer
}


class BenchmarkError(ValueError):
    """A benchmark file that is not one of the three layouts, or a row without a letter answer."""


def detect_layout(path: Path) -> Layout:
    """The layout of a benchmark CSV from its first row. BenchmarkError names the file and what was found."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = next(csv.reader(f), None)
    if not first:
        raise BenchmarkError(f"{path} is empty: a benchmark CSV needs a question, options A-D and an answer per row")
    cells = [c.strip() for c in first]
    if cells[1:7] == ["Question", *LETTERS, "Answer"] or cells[:6] == ["Question", *LETTERS, "Answer"]:
        return LAYOUTS["cmmlu"]  # with or without the leading index column (the Hub's Parquet has none)
    if cells[:7] == ["id", "question", *LETTERS, "answer"]:
        return LAYOUTS["ceval"]
    if "A" in cells and cells[cells.index("A"):cells.index("A") + 4] == list(LETTERS):
        if not {"answer", "Answer"} & set(cells):  # C-Eval's test split
            raise BenchmarkError(f"{path}: header {cells[:8]} has no answer column (C-Eval's test split has no "
                                 "answers: use its val split)")  # fmt: skip
        raise BenchmarkError(f"{path}: header {cells[:8]} is none of the layouts: CMMLU ('[,]Question,A,B,C,D,Answer') "
                             "or C-Eval ('id,question,A,B,C,D,answer'); rename or reorder its columns")  # fmt: skip
    if len(cells) == 6 and cells[5].upper() in LETTERS:
        return LAYOUTS["mmlu"]
    raise BenchmarkError(f"{path}: first row {cells[:8]} is none of the layouts: CMMLU (',Question,A,B,C,D,Answer'), "
                         "C-Eval ('id,question,A,B,C,D,answer') or MMLU (no header; question,A,B,C,D,answer)")  # fmt: skip


def check_answers(path: Path, layout: Layout) -> int:
    """Number of questions; BenchmarkError for the first row whose answer is not A-D or that lacks a column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        names = next(rows) if layout.header else ["question", *LETTERS, "answer"]
        index = {name.strip(): i for i, name in enumerate(names)}
        count = 0
        for line, row in enumerate(rows, 2 if layout.header else 1):
            if len(row) < len(names):
                raise BenchmarkError(f"{path} line {line}: {len(row)} columns, the header has {len(names)}")
            answer = row[index[layout.answer]].strip()
            if answer.upper() not in LETTERS:
                hint = " (C-Eval's test split has no answers: use its val split)" if not answer else ""
                raise BenchmarkError(f"{path} line {line}: answer {answer!r} is not one of A, B, C, D{hint}")
            count += 1
    if count == 0:
        raise BenchmarkError(f"{path} has no questions")
    return count


def task_config(name: str, test: Path, dev: Path | None, shots: int, limit: int | None = None) -> dict:
    """lm-eval's config for one benchmark (a dict, as its YAML task files hold); `limit`: the first N questions.
    Both files are checked first (no model is needed): BenchmarkError when one cannot be read, is no known layout,
    has a bad answer, or when the dev file has another layout than the test file or fewer rows than `shots`."""
    for path in filter(None, (test, dev)):
        problem = read_problem(path)
        if problem:
            raise BenchmarkError(problem)
    layout = detect_layout(test)
    check_answers(test, layout)
    if dev:
        dev_layout = detect_layout(dev)
        if dev_layout != layout:
            raise BenchmarkError(f"{dev} is in the {dev_layout.name} layout and {test} in the {layout.name} "
                                 "layout: give both in one layout")  # fmt: skip
        rows = check_answers(dev, layout)
        if rows < shots:
            raise BenchmarkError(f"{dev} has {rows} worked examples, shots asks for {shots}: lower shots")
    files = {"test": str(test)} | ({"dev": str(dev)} if dev else {})
    q, a = layout.question, layout.answer
    config = {
        "task": name,
        "dataset_path": "csv",
        "dataset_kwargs": {"data_files": files} | ({} if layout.header else {"column_names": [q, *LETTERS, a]}),
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": f"{{{{{q}.strip()}}}}\n" + "".join(f"{c}. {{{{{c}}}}}\n" for c in LETTERS) + layout.cue,
        "doc_to_choice": list(LETTERS),
        "doc_to_target": f"{{{{{list(LETTERS)}.index({a}.strip().upper())}}}}",
        "target_delimiter": "",  # the letter is the assistant's first token, right after the template's turn start
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": shots,
    }
    if dev and shots:
        config["fewshot_split"] = "dev"
        config["fewshot_config"] = {"sampler": "first_n"}  # the dev file's first `shots` rows, in file order
    if limit:
        config["process_docs"] = lambda docs: docs.select(range(min(limit, len(docs))))  # the first `limit` questions
    return config


def read_problem(path: Path) -> str | None:
    """Why `path` cannot be read as a benchmark file, or None."""
    if not path.exists():
        return f"{path} does not exist: put the CSV there or change the path"
    if not path.is_file():
        return f"{path} is not a file: give a CSV file"
    try:
        path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
    return None


def accuracy(model, tokenizer, tasks: list[dict], batch_size: int, seed: int = 0) -> dict:
    """{benchmark name: {"accuracy": 0-1, "questions": n}} for a loaded causal LM, plus "overall" (per question).

    Few-shot examples are the first `num_fewshot` rows of each dev file, given as earlier chat turns. Each result
    also has "choices": the index of the chosen option per question, in file order. Scoring rule: lm-eval's
    `multiple_choice` output type (argmax of the options' summed log-likelihoods).
    """
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # its notice that `pretrained` is a model object: that is how eval shares the model it loaded
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with quiet_bars():
        result = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, apply_chat_template=True, fewshot_as_multiturn=True,
            task_manager=_no_builtin_tasks(), random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, verbosity="ERROR", log_samples=True,
        )  # fmt: skip
    scores = {}
    for task in tasks:
        entry = result["results"][task["task"]]
        samples = sorted(result["samples"][task["task"]], key=lambda sample: sample["doc_id"])
        choices = [max(range(len(LETTERS)), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
        scores[task["task"]] = {"accuracy": entry["acc,none"], "questions": len(samples), "choices": choices}
    total = sum(s["questions"] for s in scores.values())
    scores["overall"] = {"accuracy": sum(s["accuracy"] * s["questions"] for s in scores.values()) / total,
                         "questions": total, "choices": []}  # fmt: skip
    return scores


@contextlib.contextmanager
def quiet_bars():
    """lm-eval's and datasets' progress bars (several unlabelled ones per benchmark) kept out of the log; eval
    prints its own line per model. What they wrote comes out if the scoring fails."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue()[-5000:])
        raise
    finally:
        if was:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=1)
def _no_builtin_tasks():
    """lm-eval's task index without its ~14,000 bundled task files: indexing them took 30 s per call, and every task
    here is a config built above."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


def write_builtin(name: str, seed: int, folder: Path | None = None) -> tuple[Path, Path]:
    """Write a built-in set as CMMLU-layout dev.csv and test.csv; returns (test, dev)."""
    from .toy_choice import BUILTIN

    folder = folder or Path(tempfile.mkdtemp(prefix=f"{name}-"))
    folder.mkdir(parents=True, exist_ok=True)
    dev_rows, test_rows = BUILTIN[name](seed)
    paths = []
    for split, rows in (("test", test_rows), ("dev", dev_rows)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["", "Question", *LETTERS, "Answer"])
            writer.writerows([i, r["question"], *r["options"], r["answer"]] for i, r in enumerate(rows))
        paths.append(path)
    return paths[0], paths[1]


def fetch_hub(hub, folder: Path, network) -> tuple[Path, Path | None]:
    """The test and dev files of params `hub` (repo, revision, test, dev) as benchmark CSVs: downloaded into the
    Hub cache at the pinned commit (or found there offline), Parquet written to `folder` as CSV. SourceError (one
    line, naming the repo and file) when a file cannot be had."""
    from stages.lib.data.sources import hub_errors, hub_limits

    hub_limits(network)
    from huggingface_hub import hf_hub_download

    files = []
    for split, name in (("test", hub.test), ("dev", hub.dev)):
        if name is None:
            files.append(None)
            continue
        with hub_errors(f"hub benchmark {hub.repo}@{hub.revision} file {name}"):
            local = Path(hf_hub_download(hub.repo, name, repo_type="dataset", revision=hub.revision))
        converted = folder / split / Path(name).with_suffix(".csv").name
        files.append(local if local.suffix == ".csv" else parquet_as_csv(local, converted, f"{hub.repo}/{name}"))
    return files[0], files[1]


def parquet_as_csv(path: Path, out: Path, origin: str) -> Path:
    """A Parquet benchmark file as CSV: MMLU's Hub layout (question, choices list, answer index 0-3) becomes the
    MMLU CSV layout; any other table keeps its columns under a header (CMMLU and C-Eval layouts), without
    pandas' index columns. BenchmarkError naming `origin` (repo and file) and the row for a file that is not
    Parquet or a question, option or answer that is missing or of the wrong kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise BenchmarkError(f"{origin} is not a readable Parquet file ({str(exc)[:120]})") from None
    columns = [c for c in table.column_names if not c.startswith("__index_level_")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if {"question", "choices", "answer"} <= set(columns):
            for i, row in enumerate(table.select(["question", "choices", "answer"]).to_pylist()):
                writer.writerow(mmlu_row(row, f"{origin} row {i}"))
            return out
        writer.writerow(columns)
        for i, row in enumerate(table.select(columns).to_pylist()):
            missing = [c for c in columns if row[c] is None and c not in ("id", "explanation")]
            if missing:
                raise BenchmarkError(f"{origin} row {i}: no value in {', '.join(missing)}")
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out


def mmlu_row(row: dict, where: str) -> list:
    """[question, A, B, C, D, letter] of one MMLU-Hub record; BenchmarkError naming `where` otherwise."""
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) != 4 or \
            not all(isinstance(c, str) for c in choices):
        raise BenchmarkError(f"{where}: needs a question and a list of four text choices, got {question!r}, "
                             f"{choices!r}")  # fmt: skip
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise BenchmarkError(f"{where}: answer {answer!r} is not an index 0-3 into the choices")
    return [question, *choices, LETTERS[answer]]
