"""The export stage: models/merged → GGUF files (llama.cpp's converter and quantizer) and an Ollama Modelfile.

The fast tests read the files back with gguf-py's reader and render the Modelfile's Go template; the slow one runs
the files in llama.cpp itself (llama-cpp-python, the `gguf` extra, which builds llama.cpp from source).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import edit_params, env_with_project

from stages.lib.chat.format import to_jinja
from stages.lib.core.errors import UserError
from stages.lib.core.recipes import template_recipe
from stages.lib.export import converter, modelfile, pretokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "翻译成英文。\n黑色的羊"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": 'say "hi"'},
     {"role": "assistant", "content": "hi {{ .Content }}"}, {"role": "user", "content": "again\n"}],
]  # fmt: skip


def jinja_prompt(jinja: str, messages: list[dict]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=jinja, add_generation_prompt=True)
    return rendered[0]


@pytest.mark.parametrize("name", ["chatml", "seed", "raw", "chatglm2", "qwen3", "tokenizer"])
def test_the_go_template_renders_what_the_jinja_template_renders(name):
    """Written from the recipe, read back from the Modelfile text and rendered as Go's text/template does, the
    template gives the training prompt text; a format Go templates cannot express gets no TEMPLATE."""
    recipe = template_recipe(name)
    go = modelfile.go_template(recipe, "[gMASK]<sop>")
    if name in ("chatglm2", "qwen3", "tokenizer"):  # {round}, a recipe Jinja, the tokenizer's own template
        assert go is None
        assert "no TEMPLATE" in modelfile.Modelfile("model-f16.gguf", None, "", ["</s>"]).text()
        return
    made = modelfile.parse(modelfile.Modelfile("model-f16.gguf", go, "", ["<|im_end|>"]).text())
    assert made.source == "model-f16.gguf" and made.stops == ["<|im_end|>"] and made.template == go
    jinja = to_jinja(recipe, name, "[gMASK]<sop>")
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system" and not recipe.system:
            messages = messages[1:]
        assert modelfile.render(made.template, messages) == jinja_prompt(jinja, messages)


def test_a_template_that_renders_another_prompt_is_refused():
    recipe = template_recipe("chatml")
    made = modelfile.Modelfile("model-f16.gguf", modelfile.go_template(recipe, ""), "", [])
    want = jinja_prompt(to_jinja(recipe, "chatml", ""), CONVERSATIONS[0])
    def encode(text: str) -> list[int]:
        return list(text.encode())

    modelfile.check(made, CONVERSATIONS[:1], [encode(want)], encode)
    with pytest.raises(UserError, match="which is not the training prompt"):
        modelfile.check(made, CONVERSATIONS[:1], [encode(want.replace("assistant", "bot"))], encode)


def cross_character_tokenizer(folder: Path) -> Path:
    """A byte-level BPE trained with CJK runs kept whole (merges span characters), then given the CJK-isolating
    pre-tokenizer of stages/download.py: llama.cpp's gpt-2 split would encode its text differently."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["你好世界"] * 50, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    cjk = pre_tokenizers.Split(Regex(pretokenizer.CJK_ISOLATED), behavior="isolated")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([cjk, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    folder.mkdir()
    bpe.save(str(folder / "tokenizer.json"))
    return folder


def test_a_pre_tokenizer_llama_cpp_would_split_otherwise_is_refused(tmp_path):
    folder = cross_character_tokenizer(tmp_path / "tok")
    assert pretokenizer.first_difference(folder / "tokenizer.json", ["abc"]) is None
    with pytest.raises(UserError, match="would encode '你好世界' to other ids than training did"):
        pretokenizer.unrecognized(folder, ["abc", "你好世界"], NotImplementedError("BPE pre-tokenizer was not recognized"))


@pytest.fixture(scope="module")
def exported(default_run, tmp_path_factory) -> Path:
    """A copy of the default run with export.types [f16, q8_0], its export stage run as `dvc repro` runs it."""
    repo = tmp_path_factory.mktemp("export") / "repo"
    shutil.copytree(default_run.repo, repo, symlinks=True, ignore=shutil.ignore_patterns(".git", ".dvc"))
    assert sorted(p.name for p in (repo / "models" / "gguf").iterdir()) == []  # the default writes no GGUF
    edit_params(repo, **{"export.types": ["f16", "q8_0"]})
    proc = subprocess.run([sys.executable, "-m", "stages.export"], cwd=repo, env=env_with_project(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return repo


def test_the_gguf_files_hold_the_model_template_stops_and_tokenizer(exported):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from stages.lib.export import readback

    _, gguf = converter.load(converter.converter_folder(None))
    tokenizer = AutoTokenizer.from_pretrained(exported / "models" / "merged")
    fmt = json.loads((exported / "data" / "tokenized" / "tokenizer" / "chat_format.json").read_text())
    with safe_open(exported / "models" / "merged" / "model.safetensors", "pt") as f:
        weights = {name: f.get_tensor(name) for name in f.keys()}
    for type_name, kind in (("f16", "F16"), ("q8_0", "Q8_0")):
        got = readback.read(gguf, exported / "models" / "gguf" / f"model-{type_name}.gguf")
        meta = got["meta"]
        assert meta["tokenizer.chat_template"] == fmt["chat_template"] == tokenizer.chat_template
        assert meta["tokenizer.ggml.eos_token_id"] == fmt["stop_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
        assert len(meta["tokenizer.ggml.merges"]) > 0
        assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 128
        # one GGUF tensor per weight, with the weight's shape (GGUF lists dimensions innermost first)
        assert len(got["tensors"]) == len(weights)
        kind_of, shape = got["tensors"]["token_embd.weight"]
        assert kind_of == kind and shape[::-1] == list(weights["model.embed_tokens.weight"].shape)
        assert got["tensors"]["blk.1.attn_q.weight"][0] == kind
        assert got["tensors"]["blk.1.attn_norm.weight"][0] == "F32"  # norms stay in 32 bits
    reader = gguf.GGUFReader(exported / "models" / "gguf" / "model-f16.gguf")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert (embedding.data.astype("float32") == weights["model.embed_tokens.weight"].half().float().numpy()).all()


def test_the_modelfile_renders_the_training_prompts(exported):
    from datasets import load_from_disk

    made = modelfile.parse((exported / "models" / "gguf" / "Modelfile").read_text())
    assert made.source == "model-f16.gguf" and (exported / "models" / "gguf" / made.source).is_file()
    assert made.stops == ["<|im_end|>"] and made.system == ""
    rows = load_from_disk(str(exported / "data" / "tokenized"))["validation"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "models" / "merged")
    for row in rows:
        text = modelfile.render(made.template, row["messages"][:-1])
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == row["input_ids"][: row["prompt_length"]]
    metrics = json.loads((exported / "metrics" / "export.json").read_text())
    assert metrics["modelfile"]["prompts_checked"] == len(rows) > 0
    assert set(metrics["types"]) == {"f16", "q8_0"}
    assert metrics["types"]["q8_0"]["bytes"] < metrics["types"]["f16"]["bytes"]


def test_an_architecture_the_converter_lacks_is_one_line_before_any_work(exported, tmp_path):
    """OPT is a transformers architecture llama.cpp's converter does not write: the stage names it and keeps
    models/gguf as it was."""
    from transformers import OPTConfig, OPTForCausalLM

    repo = tmp_path / "repo"
    shutil.copytree(exported, repo, symlinks=True)
    before = {p.name: p.read_bytes() for p in (repo / "models" / "gguf").iterdir()}
    config = OPTConfig(vocab_size=413, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=64)  # fmt: skip
    shutil.rmtree(repo / "models" / "merged")
    OPTForCausalLM(config).save_pretrained(repo / "models" / "merged")
    proc = subprocess.run([sys.executable, "-m", "stages.export"], cwd=repo, env=env_with_project(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "does not support the architecture OPTForCausalLM" in lines[-1], proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (repo / "models" / "gguf").iterdir()} == before


def llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: pip install -e '.[gguf]' (builds llama.cpp, ~5 minutes)")
    return llama_cpp


@pytest.mark.slow  # needs the `gguf` extra (llama.cpp built from source); about a minute once installed
def test_llama_cpp_prompts_and_answers_as_transformers(exported, tmp_path):
    """llama.cpp (llama-cpp-python) builds each validation prompt from the GGUF's own chat template id for id as
    training did, and greedy-decodes the same first tokens as models/merged in transformers: f16 all of them,
    q8_0 and q4_k_m nearly all (the share is printed and kept above a floor)."""
    llama_cpp = llama_cpp_or_skip()
    import torch
    from datasets import load_from_disk
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM

    edit_params(exported, **{"export.types": ["f16", "q8_0", "q4_k_m"]})
    proc = subprocess.run([sys.executable, "-m", "stages.export"], cwd=exported, env=env_with_project(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load_from_disk(str(exported / "data" / "tokenized"))["validation"]
    model = AutoModelForCausalLM.from_pretrained(exported / "models" / "merged", dtype=torch.float32).eval()
    n = 8
    expected = []
    for row in rows:
        prompt = row["input_ids"][: row["prompt_length"]]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)  # fmt: skip
        expected.append(out[0, len(prompt):].tolist())
    agreement = {}
    for type_name in ("f16", "q8_0", "q4_k_m"):
        llm = llama_cpp.Llama(str(exported / "models" / "gguf" / f"model-{type_name}.gguf"), n_ctx=256, verbose=False)
        formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
        same = total = 0
        for row, want in zip(rows, expected):
            built = formatter(messages=row["messages"][:-1])
            ids = llm.tokenize(built.prompt.encode(), add_bos=not built.added_special, special=True)
            assert ids == row["input_ids"][: row["prompt_length"]], built.prompt
            llm.reset()
            got = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                got.append(token)
                if len(got) == n:
                    break
            same += sum(a == b for a, b in zip(got, want))
            total += n
        agreement[type_name] = same / total
    print(f"first {n} greedy tokens equal to transformers': {agreement}")
    assert agreement["f16"] == 1.0
    assert agreement["q8_0"] >= 0.9 and agreement["q4_k_m"] >= 0.5


def tiny_model(kind: str, shared_data: Path, folder: Path) -> Path:
    """A tiny random model folder of `kind` with a real tokenizer from ../shared/data, as merge writes one."""
    import torch
    from transformers import (AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    if kind == "llama-sentencepiece":  # stories260K: a real Llama whose tokenizer.json merge would copy
        shutil.copytree(shared_data / "models" / "stories260K", folder, ignore=shutil.ignore_patterns("tokenizer.model"))
        AutoTokenizer.from_pretrained(shared_data / "models" / "stories260K").save_pretrained(folder)
        return folder
    if kind == "mixtral":  # a SentencePiece vocabulary, experts saved one by one
        tokenizer = AutoTokenizer.from_pretrained(shared_data / "models" / "stories260K")
        MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2)).save_pretrained(folder)  # fmt: skip
        tokenizer.save_pretrained(folder)
        return folder
    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "qwen2")
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=128, **shape))
    else:  # saved one expert per tensor, as transformers 5 writes a checkpoint
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                                                   num_experts=4, num_experts_per_tok=2, **shape))  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # about 40 s each: the Qwen2 tokenizer's 151k tokens go through the converter's Python loops
@pytest.mark.shared_data
@pytest.mark.parametrize("kind, arch, pre", [("qwen2", "qwen2", "qwen2"), ("qwen3_moe", "qwen3moe", "qwen2"),
                                             ("llama-sentencepiece", "llama", "default"),
                                             ("mixtral", "llama", "default")])  # fmt: skip
def test_the_recipes_architectures_convert_with_their_tokenizers(kind, arch, pre, shared_data, tmp_path):
    """Qwen2, a Qwen3 mixture of experts, a SentencePiece Llama and Mixtral (experts stacked per layer): llama.cpp's
    converter recognizes each tokenizer (no pre-tokenizer named by us) and writes every token."""
    from transformers import AutoTokenizer

    from stages.lib.export import readback

    folder = tiny_model(kind, shared_data, tmp_path / kind)
    conversion, gguf = converter.load(converter.converter_folder(None))
    cls = converter.model_class(conversion, folder, "test")
    converter.convert(cls, gguf, folder, tmp_path / "m.gguf", "q8_0", vocab_hook=lambda model: None, name=kind)
    meta = readback.read(gguf, tmp_path / "m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert meta["meta"]["general.architecture"] == arch
    assert meta["meta"]["tokenizer.ggml.pre"] == pre
    tokens = meta["meta"]["tokenizer.ggml.tokens"]
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if kind in ("qwen3_moe", "mixtral"):
        assert meta["tensors"]["blk.0.ffn_gate_exps.weight"][1] == [64, 32, 4]  # hidden x expert width x experts
