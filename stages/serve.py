"""`python -m stages.serve`: models/merged behind an OpenAI-compatible HTTP API, on http://127.0.0.1:8000/v1.

transformers' own server (`transformers serve`, FastAPI + uvicorn) pinned to the model folder, with a check in
front (stages/lib/serve): only POST /v1/chat/completions (streaming or not), GET /v1/models and GET /health; a
request naming another model gets a 404 `model_not_found`, empty messages, a role the chat template refuses, a
field of the wrong JSON type (no conversion: `max_tokens: true` is refused, not read as 1), NaN or Infinity, a
seed beyond torch's range or a max_tokens beyond the context a 400 naming the field, all as OpenAI's error JSON.
The prompt is the model's chat template, the one it was trained with; answers end at its stop tokens. Any OpenAI
client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="models/merged", messages=[{"role": "user", "content": "..."}])

It listens on 127.0.0.1 only unless `--host` says otherwise; on a loopback address it answers only requests for
localhost, 127.x.x.x or [::1] (403 for other Host names: a web page cannot reach it by DNS rebinding). `--api-key
KEY`, or the DVC_QLORA_API_KEY environment variable (which `ps` does not show), makes every route but GET /health
require `Authorization: Bearer KEY` (the client's api_key; 401 `invalid_api_key` otherwise). The key travels in
clear text: beyond this machine, put a TLS proxy in front. For GPU clusters and many users at once, vLLM serves
the same folder (docs/guide.md). Needs the `serve` extra: pip install -e '.[serve]'.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
from pathlib import Path

from stages.lib.core.errors import UserError, run_command
from stages.lib.serve.guard import API_KEY_ENV, listens_on_loopback
from stages.lib.serve.model import MERGED, check_model_folder

NEEDED = ("fastapi", "uvicorn", "openai")  # transformers[serving]; the rest of it is in the main dependencies


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MERGED, help="the model folder to serve, with the training "
                        "tokenizer; requests name it by this path or its folder name (default: %(default)s)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, which "
                        "answers Host localhost, 127.x.x.x and [::1] only; 0.0.0.0 for every interface and any Host: "
                        "anyone who reaches it can use it unless --api-key is given)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda:0, ... "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on every route but GET "
                        f"/health (default: the {API_KEY_ENV} environment variable, which other users cannot see in "
                        "the process list; neither: no key)")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, not {args.port}")
    return args


def api_key(given: str | None) -> tuple[str | None, str]:
    """The key requests must carry (None: none) and where it came from: --api-key, else the environment variable.
    UserError for a key a client cannot send as it is (empty, or other than printable ASCII without spaces)."""
    key, source = (given, "--api-key") if given is not None else (os.environ.get(API_KEY_ENV), API_KEY_ENV)
    if key is None:
        return None, ""
    if not key:
        unset = f"unset {API_KEY_ENV}" if source == API_KEY_ENV else "leave --api-key out"
        raise UserError(f"{source} is empty: give a key, or {unset} to serve without one")
    if not all("!" <= c <= "~" for c in key):  # an HTTP header carries these as they are
        raise UserError(f"{source}: a key is printable ASCII without spaces (letters, digits, - _ . and the like)")
    return key, source


def check_port(host: str, port: int) -> None:
    """UserError unless `host`:`port` can be listened on now (uvicorn would print a traceback-free but late
    error, after the model has loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            advice = "give an address of this machine with --host" if exc.errno == errno.EADDRNOTAVAIL else \
                "choose another --port"
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; {advice}") from None


def check_device(name: str) -> None:
    """UserError unless `name` (--device) is `auto` or a torch device this machine has: cpu, cuda, cuda:N with N
    below the GPU count, mps where Apple's backend is built (transformers serve would fail at load, with a
    traceback)."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {name}: this machine has no CUDA GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: transformers serve runs on cpu, cuda or mps; use one of them or auto")


def main(argv: list[str] | None = None) -> None:
    from stages.lib.core.quiet import quiet

    quiet()
    args = parse_args(argv)
    key, source = api_key(args.api_key)
    check_model_folder(args.model, "merge", "--model")
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the server needs {', '.join(missing)}: pip install -e '.[serve]'")
    check_device(args.device)
    check_port(args.host, args.port)
    from stages.lib.serve.server import Pinned

    print(f"serve: loading {args.model}", flush=True)
    server = Pinned(args.model, args.host, args.port, args.device, api_key=key)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serve: {args.model} at http://{host}:{args.port}/v1 (POST /v1/chat/completions, model "
          f"{str(args.model)!r}); Ctrl-C stops", flush=True)  # fmt: skip
    if key:
        print(f"serve: requests need `Authorization: Bearer KEY`, the key of {source}", flush=True)
    elif not listens_on_loopback(args.host):
        print(f"serve: no API key and --host {args.host}: whoever reaches this port can use the model "
              f"(--api-key or {API_KEY_ENV} requires a key)", flush=True)  # fmt: skip
    server.run()


if __name__ == "__main__":
    run_command(main)
