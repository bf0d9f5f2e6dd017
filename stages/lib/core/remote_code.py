"""A model folder's own Python code runs only with `model.trust_remote_code: true`.

Every `from_pretrained` in stages/ passes `trust_remote_code` as a bool, never None: with None, transformers asks
"Do you wish to run the custom code? [y/N]" on stdin, and any pipe that says y ran the code. A folder that needs
its own code is refused before transformers reads it (`check_no_custom_code`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .errors import UserError
from .params import ParamsError, load_params

KEY = "model.trust_remote_code"
CODE_FILES = ("config.json", "tokenizer_config.json")  # where transformers looks for auto_map


@functools.cache
def trusted() -> bool:
    """model.trust_remote_code of params.yaml; False where params.yaml is absent or invalid (chat and serve also
    run outside a pipeline; a stage has checked params.yaml before this is asked)."""
    try:
        return load_params().model.trust_remote_code
    except ParamsError:
        return False


def check_no_custom_code(folder: Path, what: str) -> None:
    """UserError naming the file and the key if `folder` (`what` in messages) holds an `auto_map` in config.json
    or tokenizer_config.json, i.e. classes from its own .py files (or another Hub repo), while the key is false.
    An absent or unreadable file is left to the folder's other checks."""
    if trusted():
        return
    for name in CODE_FILES:
        path = Path(folder) / name
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            code = ", ".join(sorted(p.name for p in Path(folder).glob("*.py"))) or "code from another Hub repo"
            raise UserError(f"{what}: {path} has an auto_map, so loading it runs the folder's own code ({code}), and "
                            f"{KEY} is false: set {KEY}: true only if you trust that code, or delete auto_map from "
                            f"{name} to load it with transformers' own classes")  # fmt: skip
