"""The training prompt format in a GGUF file's metadata, set on llama.cpp's converter while it writes: which
pre-tokenizer llama.cpp splits text with, the stop tokens, the chat template, and no BOS/EOS of llama.cpp's own."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import pretokenizer


def recognizing(cls, model_dir: Path, texts: Callable[[], list[str]]):
    """A factory of converter models (`cls(...)`) whose pre-tokenizer is the converter's own, or, for a tokenizer
    it does not recognize, `pretokenizer.unrecognized`'s name, checked on `texts()` once for all files."""
    decided: dict[str, str] = {}

    def make(*args, **kwargs):
        model = cls(*args, **kwargs)
        recognize = model.get_vocab_base_pre

        def pre(tokenizer) -> str:
            if "pre" not in decided:
                try:
                    decided["pre"] = recognize(tokenizer)
                except NotImplementedError as exc:
                    decided["pre"] = pretokenizer.unrecognized(model_dir, texts(), exc)
            return decided["pre"]

        model.get_vocab_base_pre = pre
        return model

    return make


def training_format(gguf, chat_template: str, stop_ids: list[int]) -> Callable:
    """A hook for after the converter's set_vocab: the training `chat_template`, EOS = stop_ids[0] (EOT = the
    second, if any), and add_bos/add_eos false: the template writes any prefix, as in training."""

    def hook(model) -> None:
        w = model.gguf_writer
        keys = gguf.Keys.Tokenizer
        for key in (keys.ADD_BOS, keys.ADD_EOS, keys.EOS_ID, keys.EOT_ID, keys.CHAT_TEMPLATE):
            w.remove_key(key)  # the converter's values (from tokenizer_config.json) give way to the format's
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_eos_token_id(stop_ids[0])
        if len(stop_ids) > 1:
            w.add_eot_token_id(stop_ids[1])
        w.add_chat_template(chat_template)

    return hook
