"""The data layer of the download stage: any layout `datasets` reads, column and role mapping, drops counted by
reason, errors that name the source, record and field, mixtures, and the split by content."""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
import lzma
import os
import random
import signal
from pathlib import Path

import pytest
from conftest import data_source, default_params
from conftest import normalized as normalize

from stages.lib.core.errors import UserError
from stages.lib.core.params import ParamsError, validate
from stages.lib.data.mix import build_raw, summary_line
from stages.lib.data.normalize import Normalizer, RecordError
from stages.lib.data.read import MAX_DEPTH, Nesting, SourceError, check_regular, read_table

RECORDS = [{"instruction": "说你好", "input": "", "output": "你好"}, {"instruction": "Say hi", "input": "x", "output": "hi"}]


def lines(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def every_layout(folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "array.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    (folder / "lines.json").write_text(lines(RECORDS), encoding="utf-8")  # what Dataset.to_json("x.json") writes
    (folder / "array.jsonl").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    (folder / "lines.jsonl").write_bytes(codecs.BOM_UTF8 + lines(RECORDS).encode())
    for name, sep in (("data.csv", ","), ("data.tsv", "\t")):
        with open(folder / name, "w", newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            writer = csv.DictWriter(f, fieldnames=list(RECORDS[0]), delimiter=sep)
            writer.writeheader()
            writer.writerows(RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), folder / "data.parquet")
    Dataset.from_list(RECORDS).to_parquet(str(folder / "ds.parquet"))
    arrow = folder / "arrow"
    Dataset.from_list(RECORDS).save_to_disk(str(arrow))
    shards = folder / "shards"
    shards.mkdir()
    for i, r in enumerate(RECORDS):
        (shards / f"part-{i}.jsonl").write_text(lines([r]), encoding="utf-8")
    return [*sorted(p for p in folder.iterdir() if p.is_file()), next(arrow.glob("*.arrow")), shards]


def test_every_layout_reads_as_the_same_records(tmp_path):
    for path in every_layout(tmp_path / "in"):
        assert read_table(path, tmp_path / "cache").to_list() == RECORDS, path.name


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, r"missing.jsonl does not exist; `dvc exp run --temp/--queue` copies only files tracked "
                            r"by git or DVC .* `dvc add <file>`"),
    ("notes.txt", "x", r"notes.txt: unsupported data file type '.txt'"),
    ("gbk.jsonl", "你好".encode("gbk"), r"gbk.jsonl is not UTF-8 text \(byte 0, line 1\): re-save it as UTF-8, e.g. "
                                        r"`iconv -f GBK -t UTF-8"),
    ("utf16.json", "[]".encode("utf-16"), r"utf16.json is UTF-16 text"),
    ("broken.json", b'{"a": "x"}\n{"a": \n', r"broken.json cannot be read as json: line 2 is not valid JSON"),
    ("scalar.jsonl", b'{"a": "x"}\n5\n', r"scalar.jsonl cannot be read as json: line 2 is a JSON int, not an object"),
    ("empty.jsonl", b"", r"empty.jsonl cannot be read as json: the file is empty"),
    ("header.csv", b"instruction,output\n", r"header.csv holds no records"),
    ("nobom16.json", "[]".encode("utf-16-le"), r"nobom16.json holds NUL bytes: UTF-16 text without a byte-order mark"
                                               r"\? Re-save it as UTF-8 \(iconv -f UTF-16LE"),
    ("be16.json", "[]".encode("utf-16-be"), r"iconv -f UTF-16BE -t UTF-8"),
    ("deep.jsonl", lines(RECORDS) + "[" * 100_000 + "\n",
     r"deep.jsonl cannot be read as json: line 3 nests arrays and objects more than 63 levels deep"),
    ("deep-closed.jsonl", lines(RECORDS) + '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     r"line 3 nests arrays and objects more than 63 levels deep"),  # pyarrow's parser crashed the process on it
    ("deep.json", "[" + "[" * 100_000, r"deep.json cannot be read as json: line 1 nests arrays and objects"),
    ("surrogate.jsonl", lines(RECORDS) + '{"instruction": "a\\ud800", "output": "b"}\n',
     r"surrogate.jsonl cannot be read as json: line 3 holds an invalid surrogate escape \\ud800"),
    ("duplicate.jsonl", '{"instruction": "a", "output": "b", "output": "c"}\n' + lines(RECORDS),
     r"duplicate.jsonl cannot be read as json: line 1 has a duplicate key 'output' \(an object names it twice\)"),
    ("nested-duplicate.jsonl", lines(RECORDS) + '{"instruction": "a", "output": "b", "m": [{"k": 1, "k": 2}]}\n',
     r"line 3 has a duplicate key 'k'"),
    ("zipped.jsonl", gzip.compress(lines(RECORDS).encode(), mtime=0),
     r"zipped.jsonl is gzip-compressed, not text: decompress it \(`mv zipped.jsonl zipped.jsonl.gz && gunzip"),
    ("x.jsonl", bz2.compress(lines(RECORDS).encode()), r"x.jsonl is bzip2-compressed"),
    ("x.csv", lzma.compress(b"instruction,output\na,b\n"), r"x.csv is xz-compressed"),
    ("sheet.csv", b"PK\x03\x04" + bytes(100), r"sheet.csv is a zip archive \(an Excel .xlsx workbook is one\)"),
    ("u32.json", json.dumps(RECORDS).encode("utf-32"), r"u32.json is UTF-32 text: re-save it as UTF-8 \(iconv -f UTF-32 "
                                                       r"-t UTF-8\)"),
    ("u32le.jsonl", lines(RECORDS).encode("utf-32-le"), r"UTF-32 text without a byte-order mark\? .*iconv -f UTF-32LE"),
    ("u32be.jsonl", lines(RECORDS).encode("utf-32-be"), r"iconv -f UTF-32BE -t UTF-8"),
    ("binary.jsonl", bytes(range(256)) * 4, r"binary.jsonl holds NUL bytes and is no text encoding"),
    ("page.jsonl", b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
     r"page.jsonl is an HTML page, not data: .*Use the raw or download link"),
])  # fmt: skip
def test_unreadable_files_are_one_line_naming_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SourceError, match=message) as err:
        read_table(path, tmp_path / "cache")
    assert "\n" not in str(err.value)


def test_json_nested_up_to_the_limit_reads(tmp_path):
    path = tmp_path / "nested.jsonl"
    deepest = json.loads("[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1))  # MAX_DEPTH with the record
    path.write_text(lines([r | {"extra": deepest} for r in RECORDS]))
    assert len(read_table(path, tmp_path / "cache")) == 2
    path.with_suffix(".json").write_text(json.dumps([r | {"extra": deepest} for r in RECORDS]))
    assert len(read_table(path.with_suffix(".json"), tmp_path / "cache")) == 2


def _depth_by_hand(text: str, lines: bool) -> int | None:
    """The reference for Nesting: a byte at a time; a quote after an odd run of backslashes is escaped."""
    depth, inside, run, line = (0 if lines else -1), False, 0, 1
    for ch in text:
        if ch == '"' and run % 2 == 0:
            inside = not inside
        elif not inside and ch in "[{":
            depth += 1
        elif not inside and ch in "]}":
            depth -= 1
        if depth > MAX_DEPTH:
            return line
        run = run + 1 if ch == "\\" else 0
        if ch == "\n":
            line += 1
            depth, inside = (0, False) if lines else (depth, inside)
    return None


def test_the_nesting_scan_agrees_with_a_scan_by_hand_across_chunk_boundaries():
    rng = random.Random(7)
    pieces = ["[", "]", "{", "}", '"', "\\", "a", "\n", " ", "[[[[", '\\"', "\\\\", "[" * 30, "é"]
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 300)))
        lines_mode = rng.random() < 0.5
        step = rng.choice([1, 2, 3, 7, 64, 1 << 20])
        assert Nesting(lines_mode).feed(text.encode(), step=step) == _depth_by_hand(text, lines_mode), (text, step)


def test_a_path_that_is_no_regular_file_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO waits for a writer: the stage would hang, so the check must not open it (the alarm fails the
    test instead of hanging it)."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.jsonl").write_text(lines(RECORDS))
    os.mkfifo(folder / "b.jsonl")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the reader opened the FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(SourceError, match=r"data file .*pipe.jsonl is a named pipe \(FIFO\), not a regular file"):
            read_table(tmp_path / "pipe.jsonl", tmp_path / "cache")
        with pytest.raises(SourceError, match=r"set/b.jsonl is a named pipe"):
            read_table(folder, tmp_path / "cache")
        with pytest.raises(SourceError, match=r"/dev/null is a device, not a regular file"):
            check_regular(Path("/dev/null"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_folders_without_data_or_with_mixed_types_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="data folder .*empty holds no"):
        read_table(tmp_path / "empty", tmp_path / "cache")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(lines(RECORDS))
    (mixed / "b.csv").write_text("instruction,output\nx,y\n")
    with pytest.raises(SourceError, match=r"mixes file types \(.csv, .jsonl\)"):
        read_table(mixed, tmp_path / "cache")
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "a.jsonl").write_text(lines(RECORDS))
    (shapes / "b.jsonl").write_text(lines([r | {"id": 1} for r in RECORDS]))
    with pytest.raises(SourceError, match=r"the files of .*shapes have different columns \(a.jsonl: instruction, "
                                          r"input, output; b.jsonl: .*id.*\): give each layout its own source"):  # fmt: skip
        read_table(shapes, tmp_path / "cache")
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "a.jsonl").write_text(lines([{"instruction": "q", "output": "a", "history": []}]))
    (nested / "b.jsonl").write_text(lines([{"instruction": "q", "output": "a", "history": [["q", "a"]]}]))
    with pytest.raises(SourceError, match=r"the files of .*nested disagree on the type of a column"):
        read_table(nested, tmp_path / "cache")
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(RECORDS), test=Dataset.from_list(RECORDS)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match=r"dd is a saved DatasetDict with splits test, train: point the path at one "
                                          r"split's folder \(.*dd/test\)"):  # fmt: skip
        read_table(tmp_path / "dd", tmp_path / "cache")


def test_alpaca_fields_become_turns():
    record = {"instruction": "介绍", "input": "北京", "output": "首都。", "history": [["你好", "你好！"]], "system": "S"}
    assert normalize([record])["messages"] == [[
        {"role": "system", "content": "S"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "介绍\n北京"},
        {"role": "assistant", "content": "首都。"},
    ]]  # fmt: skip


def test_openai_and_sharegpt_layouts_agree_and_keep_the_system_prompt():
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]  # fmt: skip
    openai = {"messages": expected}
    sharegpt = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                  {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}],
                "system": "S"}  # LLaMA-Factory's ShareGPT: the system prompt is a top-level key
    assert normalize([openai], "messages")["messages"] == normalize([sharegpt], "messages")["messages"] == [expected]


def test_belle_columns_and_custom_message_keys_and_roles_map_by_params():
    belle = normalize([{"question": "1+1?", "std_answer": "2", "id": 7}], columns={"instruction": "question",
                      "output": "std_answer"})  # fmt: skip
    assert belle["messages"] == [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]]
    odd = {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "bot", "text": "hello"}]}
    out = normalize([odd], "messages", columns={"messages": "dialog", "role": "speaker", "content": "text"},
                    roles={"customer": "user", "bot": "assistant"})  # fmt: skip
    assert out["messages"] == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


def test_records_with_nothing_to_train_are_dropped_with_a_reason():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
    out = normalize([
        {"messages": [{"role": "user", "content": "q"}, call, {"role": "tool", "content": "{}"}]},
        {"messages": [{"role": "user", "content": "q"}, call]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ], "messages")  # fmt: skip
    assert out["drop"] == ["no_answer", "", "empty_answer"]  # ends in a tool result; a call is an answer
    out = normalize([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ], "messages")  # fmt: skip
    assert out["drop"] == ["empty_answer", "no_answer", "empty_prompt", "no_trained_turn", ""]


@pytest.mark.parametrize("record, fmt, options, message", [
    ({"question": "q", "answer": "a"}, "alpaca", {},
     r"source x: no column 'instruction' for the alpaca field 'instruction' \(the file has: answer, question\); "
     r"map yours with columns: \{instruction: <your column>\}"),
    ({"instruction": "q", "output": 5}, "alpaca", {}, r"source x, record 0: 'output' is a int, not text"),
    ({"q": "q", "a": None}, "alpaca", {"columns": {"instruction": "q", "output": "a"}},
     r"source x, record 0: 'a' \(output\) is missing"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages", {},
     r"record 0: 'messages'\[0\]: unknown role 'robot'; map it with roles: \{robot: user\|assistant\|system\|tool\}"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "messages", {},
     "the first turn after an optional system message must be a user turn, got assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "messages", {},
     r"message 1 \(user\) cannot follow a user turn; expected assistant \(roles in order: user, user, assistant\)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"},
                   {"role": "assistant", "content": "a"}]}, "messages", {}, r"message 1 \(tool\) cannot follow a user turn.*roles: \{tool: user\}"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}]},
     "messages", {}, r"\[0\]: content\[0\] is a image part: this pipeline trains text-only models"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}], "system": "T"}, "messages", {}, "is given twice"),
    ({"messages": [{"speaker": "user", "content": "q"}]}, "messages", {"columns": {"role": "from"}},
     r"'messages'\[0\]: no role key \(from; map yours with columns: \{role: <key>\}\)"),
    ({"messages": [{"role": "user", "text": "q"}]}, "messages", {},
     r"\[0\]: content is missing \(looked for content or value; map yours with columns: \{content: <key>\}\)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "messages", {}, r"\[1\]: weight 0.5: per-turn weights are 0 \(not trained\) or 1 \(trained\)"),
    ({"q": "q", "a": "a"}, "alpaca", {"columns": {"instruction": "q", "output": "a", "input": "context"}},
     r"source x: columns maps 'input' to 'context', which the file does not have \(it has: a, q\)"),
])  # fmt: skip
def test_bad_records_name_the_source_record_and_field(record, fmt, options, message):
    with pytest.raises(RecordError, match=message):
        normalize([record], fmt, **options)


@pytest.mark.parametrize("options, message", [
    ({"columns": {"question": "q"}}, r"columns: 'question' is not a field of format alpaca"),
    ({"roles": {"bot": "assistant"}}, r"roles maps role values of messages records; this source's format is alpaca"),
])  # fmt: skip
def test_mappings_must_fit_the_format(options, message):
    raw = default_params()
    raw["data"]["sources"] = [{"kind": "builtin", **options}]
    with pytest.raises(ParamsError, match=message):
        validate(raw)


def test_unused_message_keys_are_listed():
    records = [{"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a"}]}]
    fn = Normalizer(data_source("messages"), "x", ["messages"])
    fn({"messages": [r["messages"] for r in records]}, [0])
    assert fn.unused() == ["messages.name"]


def test_moved_keys_say_where_they_went():
    raw = default_params()
    raw["data"]["format"] = "alpaca"
    with pytest.raises(ParamsError, match=r"unknown key 'data.format'; it moved to data.sources.N.format"):
        validate(raw)


def data_params(sources: list[dict], **data):
    raw = default_params()
    raw["data"] = {"sources": sources} | data
    return validate(raw).data


def qa(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"} for i in range(n)]


def built(tmp_path: Path, data, seed: int = 1, name: str = "raw") -> tuple[dict, list[dict], list[dict]]:
    out = tmp_path / name
    out.mkdir()
    manifest = build_raw(data, seed, out, tmp_path / "work")
    read = [[json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "validation")]
    return manifest, *read


def test_a_mixture_weights_caps_counts_and_never_splits_a_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "data" / "sources"
    src.mkdir(parents=True)
    (src / "big.jsonl").write_text(lines(qa(300, "big")))
    dup = qa(40, "small") + qa(10, "small")  # ten exact duplicates
    (src / "small.json").write_text(json.dumps(dup + [{"instruction": "q", "output": ""}]))
    data = data_params([
        {"kind": "local", "path": "data/sources/big.jsonl", "max_records": 200, "weight": 0.5},
        {"kind": "local", "path": "data/sources/small.json", "weight": 2},
    ], validation_fraction=0.1)
    manifest, train, validation = built(tmp_path, data)
    big, small = manifest["sources"]["big"], manifest["sources"]["small"]
    assert (big["read"], big["taken"], big["kept"]) == (300, 200, 200)
    assert small["dropped"]["empty_answer"] == 1 and small["kept"] == 50 and small["duplicates"] == 10
    assert big["validation"] + small["validation"] == len(validation) == round(240 * 0.1)  # 240 distinct records
    assert big["train"] == round((200 - big["validation"]) * 0.5)
    duplicated = {f"small question {i}" for i in range(10)}  # one copy in validation, neither copy in train
    held = [v["messages"][0]["content"] for v in validation if v["source"] == "small"]
    assert small["train"] == 2 * (50 - len(held) - len(duplicated.intersection(held)))
    assert {json.dumps(r["messages"]) for r in train}.isdisjoint(json.dumps(r["messages"]) for r in validation)
    assert [r["source"] for r in train[:20]].count("small") not in (0, 20)  # mixed, not one source after another
    assert [r["source"] for r in validation[:10]].count("small") not in (0, 10)  # eval's first rows mix them too
    _, train2, validation2 = built(tmp_path, data, name="again")
    assert (train2, validation2) == (train, validation)  # seeded
    line = summary_line(manifest)
    assert "small: 50 of 51 kept, dropped 1 empty_answer, weight 2 ->" in line and "big: 200 of 300 kept" in line
    assert "10 duplicates (kept on one side of the split)" in line


def test_nothing_left_names_the_drop_reasons(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "sources").mkdir(parents=True)
    (tmp_path / "data" / "sources" / "x.jsonl").write_text(lines([{"instruction": "q", "output": ""}] * 3))
    with pytest.raises(UserError, match="data.sources left no record to train on: dropped 3 empty_answer"):
        built(tmp_path, data_params([{"kind": "local", "path": "data/sources/x.jsonl"}]))


@pytest.mark.parametrize("key, value, message", [
    ("data", {"sources": [{"kind": "local", "path": "/etc/x.json"}]},
     r"data.sources.0.path /etc/x.json is outside data/sources/, so DVC would never see it change"),
    ("model", {"recipe": "tiny-llama", "path": "/opt/model"},
     r"model.path /opt/model is outside models/sources/.*`dvc add models/sources/<name>`"),
    ("model", {"recipe": "qwen2.5-7b-instruct", "tokenizer": "models/sources"}, r"model.tokenizer is for recipes built"),
    ("data", {"sources": [{"kind": "local", "path": "data/sources/linked-outside"}]},
     r"data.sources.0.path: data/sources/linked-outside leads to .*, outside data/sources/; DVC does not follow"),
    ("data", {"sources": [{"kind": "local", "path": "data/sources/linked-within"}]},
     r"data.sources.0.path: data/sources/linked-within leads to .*project/elsewhere, outside data/sources/"),
])  # fmt: skip
def test_local_paths_outside_the_declared_folders_are_refused_before_any_work(key, value, message, monkeypatch, tmp_path):
    from conftest import ROOT

    from stages.download import check_inputs

    project = tmp_path / "project"
    (project / "data" / "sources").mkdir(parents=True)
    (project / "models" / "sources").mkdir(parents=True)
    (project / "recipes").symlink_to(ROOT / "recipes")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jsonl").write_text(lines(RECORDS))
    (project / "data" / "sources" / "linked-outside").symlink_to(outside)  # DVC hashes neither link nor target
    (project / "elsewhere").mkdir()
    (project / "elsewhere" / "x.jsonl").write_text(lines(RECORDS))
    (project / "data" / "sources" / "linked-within").symlink_to(project / "elsewhere")
    monkeypatch.chdir(project)
    raw = default_params()
    raw[key] = value
    with pytest.raises(UserError, match=message):
        check_inputs(validate(raw))


def test_a_tokenizer_built_from_data_learns_the_training_split_text_only(tmp_path):
    from conftest import write_raw

    from stages.download import training_texts

    train = [[{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "红色的猫"}]]
    validation = [[{"role": "user", "content": "held-out words"}, {"role": "assistant", "content": "保留"}]]
    write_raw(tmp_path, train, validation)
    assert list(training_texts(tmp_path / "data" / "raw")) == ["red cat", "红色的猫"]  # no roles, keys or validation


def test_a_huge_answer_reaches_the_tokenizer_trainer_in_bounded_pieces(tmp_path):
    """BPE training time grows with the square of a word's length: a 1 MB answer without spaces took the download
    stage more than 13 minutes before it was cut into pieces (now about 14 s for the whole stage)."""
    from stages.download import TRAIN_PIECE, training_texts

    messages = [{"role": "user", "content": "long"}, {"role": "assistant", "content": "x" * 1_000_000}]
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    pieces = list(training_texts(tmp_path))
    assert "".join(pieces) == "long" + "x" * 1_000_000
    assert max(map(len, pieces)) == TRAIN_PIECE


def test_damaged_outputs_of_earlier_stages_are_named_with_the_way_back(tmp_path):
    """A file of data/raw or data/tokenized cut short or edited since its stage wrote it: one line naming the file,
    `dvc checkout` and `dvc repro -f -s <stage>` (stages/lib/core/earlier.py), not a parser's traceback."""
    from datasets import Dataset, DatasetDict

    from stages.lib.core.earlier import DamagedOutput, check_digests, load_saved, read_json
    from stages.lib.core.outputs import sha256_file

    way_back = r"restore it with `dvc checkout {0}` or re-run the stage that writes it with `dvc repro -f -s {1}`$"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.jsonl").write_text(lines(RECORDS))
    digests = {"train.jsonl": sha256_file(raw / "train.jsonl")}
    check_digests(raw, digests, raw / "manifest.json", "download")
    (raw / "train.jsonl").write_text(lines(RECORDS[:1]))  # cut at a line's end: it still parses
    cut = r"train.jsonl is damaged \(its sha256 is not the one .*manifest.json records: truncated or edited since\): "
    with pytest.raises(DamagedOutput, match=cut + way_back.format(raw, "download")):
        check_digests(raw, digests, raw / "manifest.json", "download")
    (raw / "manifest.json").write_text('{"format": "ch')
    with pytest.raises(DamagedOutput, match=r"manifest.json is damaged \(JSONDecodeError: Unterminated string"):
        read_json(raw / "manifest.json", raw, "download")
    (raw / "manifest.json").write_text('{"format": "chat"}')
    with pytest.raises(DamagedOutput, match=r"manifest.json is damaged \(no key 'sources'\)"):
        read_json(raw / "manifest.json", raw, "download", keys=("format", "sources"))

    saved = tmp_path / "tokenized"
    rows = [{"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1], "prompt_length": 1, "reference": "6 7",
             "messages": [{"role": "user", "content": "5"}, {"role": "assistant", "content": "6 7"}]}] * 2  # fmt: skip
    DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows)).save_to_disk(str(saved))
    assert len(load_saved(saved, "tokenize")["validation"]) == 2
    arrow = next((saved / "train").glob("*.arrow"))
    whole = arrow.read_bytes()
    for damage, name, reason in [
        (lambda: arrow.write_bytes(whole[: len(whole) // 2]), arrow.name, r"(OSError|ArrowInvalid): Expected to"),
        (lambda: arrow.write_bytes(b""), arrow.name, r"ArrowInvalid"),
        (lambda: (saved / "dataset_dict.json").write_text("[1]"), "dataset_dict.json", r"TypeError"),
        (lambda: (saved / "dataset_dict.json").write_text('{"splits": ["train"]}'), "dataset_dict.json",
         r"it lists no split 'validation'"),
        (lambda: (saved / "validation" / "state.json").write_text("{"), "state.json", r"JSONDecodeError"),
    ]:  # fmt: skip
        damage()
        message = rf"{name} is damaged \({reason}.*\): " + way_back.format(saved, "tokenize")
        with pytest.raises(DamagedOutput, match=message):
            load_saved(saved, "tokenize")
        DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows)).save_to_disk(str(saved))
    # a split without a column a later stage reads (hand-edited): named with the columns it has
    DatasetDict(train=Dataset.from_list(rows), validation=Dataset.from_list(rows).remove_columns("reference")).save_to_disk(
        str(saved))
    with pytest.raises(DamagedOutput, match=r"validation is damaged \(no column 'reference' \(it has input_ids, "
                       r"assistant_masks, prompt_length, messages\)\)"):
        load_saved(saved, "tokenize")
