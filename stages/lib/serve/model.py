"""The tuned model, loaded to answer: models/merged, or models/base + models/adapter unmerged (PEFT).

A `Talker` holds what a reply needs: the model, the training tokenizer (its chat template renders the training
prompt), the stop token ids and the model's context length. `prompt_ids` and `reply` build the prompt and decode
the answer as a server does (`apply_chat_template` with the assistant header opened; generation up to a stop
token, special tokens dropped), so a reply here equals the server's and eval's for the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError

MERGED = Path("models/merged")
BASE = Path("models/base")
ADAPTER = Path("models/adapter")
TRAINING_TOKENIZER = Path("data/tokenized/tokenizer")  # what merge copies into models/merged


@dataclass
class Talker:
    model: object  # a transformers causal LM (or a PEFT model around one), in eval mode
    tokenizer: object  # the training tokenizer, with the chat template it was trained with
    stop_ids: list[int]  # generation ends at the first of these
    context: int | None  # positions the model was built for (prompt + reply); None when its config does not say
    name: str  # what was loaded, for messages


def context_length(config) -> int | None:
    """Positions a model's config was built for (`max_position_embeddings`, or the older names `n_positions`,
    `seq_length`); None when the config names none."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_folder(folder: Path, made_by: str, option: str) -> None:
    """UserError naming `folder` and the way to get it, unless it holds a model's config.json; a damaged file in it
    (JSON, safetensors header) is named too, before any weights load."""
    from ..core.earlier import check_model_output

    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} holds no model (no config.json): `dvc repro` builds it (the {made_by} stage writes "
                        f"it), or name another folder with {option}")  # fmt: skip
    check_model_output(folder, made_by)


def _tokenizer(folder: Path, made_by: str):
    from ..core.earlier import load_tokenizer

    tokenizer = load_tokenizer(folder, folder, made_by)
    if not tokenizer.chat_template:
        raise UserError(f"{folder}: the tokenizer has no chat template; use the training tokenizer "
                        f"({TRAINING_TOKENIZER}, also in {MERGED})")  # fmt: skip
    return tokenizer


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_merged(folder: Path = MERGED) -> Talker:
    """models/merged (or another whole-model folder with the training tokenizer): weights in their saved dtype on
    the GPU if there is one, stop tokens from its generation_config.json (merge writes the format's there)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    check_model_folder(folder, "merge", "--model")
    tokenizer = _tokenizer(folder, "merge")
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    stops = [tokenizer.eos_token_id] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False).to(_device()).eval()
    return Talker(model, tokenizer, stops, context_length(model.config), str(folder))


def load_with_adapter(adapter: Path = ADAPTER, base: Path = BASE, tokenizer_dir: Path = TRAINING_TOKENIZER) -> Talker:
    """models/base with models/adapter on top, unmerged (PEFT), and the training tokenizer with its stop tokens
    (data/tokenized/tokenizer/chat_format.json). The base loads unquantized, as merge loads it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..chat import format as chat_format
    from ..core.earlier import check_adapter, reading

    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} holds no LoRA adapter (no adapter_config.json): `dvc repro` trains one; a "
                        "train.method: full run has no adapter, chat with models/merged")  # fmt: skip
    check_model_folder(base, "download", "--base")
    check_adapter(adapter, base)
    if not (tokenizer_dir / chat_format.FORMAT_FILE).is_file():
        raise UserError(f"{tokenizer_dir} holds no training tokenizer ({chat_format.FORMAT_FILE}): `dvc repro` "
                        "writes it (the tokenize stage), or name it with --tokenizer")  # fmt: skip
    with reading(tokenizer_dir / chat_format.FORMAT_FILE, tokenizer_dir, "tokenize"):
        stops = chat_format.load(tokenizer_dir).stop_ids
    tokenizer = _tokenizer(tokenizer_dir, "tokenize")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=False)
    model = PeftModel.from_pretrained(model, adapter).to(_device()).eval()
    return Talker(model, tokenizer, stops, context_length(model.config), f"{base} + {adapter}")


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt a server builds for `messages` (OpenAI role/content dicts): the tokenizer's chat template with
    the assistant's header opened, tokenized as `apply_chat_template` does (no special tokens added twice).
    Raises UserError with the template's own message for messages it refuses (a role it has no format for)."""
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    except TemplateError as exc:
        raise UserError(f"the chat template refuses these messages: {exc}") from None
    return list(out["input_ids"])


def reply(talker: Talker, ids: list[int], max_new_tokens: int, temperature: float = 0.0, streamer=None) -> list[int]:
    """The new token ids after prompt `ids` (a stop token, if reached, is the last), greedy at temperature 0, else
    sampled at `temperature`; at most `max_new_tokens`, cut to the room the context leaves. `streamer`: a
    transformers streamer (TextStreamer) that sees the tokens as they come. UserError when the prompt alone fills
    the context."""
    import torch

    room = max_new_tokens if talker.context is None else min(max_new_tokens, talker.context - len(ids))
    if room < 1:
        raise UserError(f"the conversation takes {len(ids)} tokens and the model's context is {talker.context}: "
                        "/reset starts a new one")  # fmt: skip
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    device = next(talker.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = talker.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=room,
            eos_token_id=talker.stop_ids,
            pad_token_id=talker.tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    return out[0, len(ids) :].tolist()
