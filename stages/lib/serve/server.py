"""transformers serve, pinned to one model folder, behind the route filter and request checks (guard, requests).

`Pinned(folder, host, port)` builds transformers' own server (`transformers serve FOLDER`: FastAPI + uvicorn,
the model loaded once, before the first request) and puts `guard.Guard` in front of its app (loopback Host values
only when `host` is a loopback address; `api_key`: the key requests must carry). transformers'
remaining errors (its 422 for a field it does not know, made a 400 as OpenAI's, a failure inside generation) are given OpenAI's error JSON
too, without a traceback in the response. `run()` serves in this thread until Ctrl-C or SIGTERM; `start()` and
`stop()` serve from a background thread (tests).
"""

from __future__ import annotations

from pathlib import Path

from . import lenient
from .guard import Guard, listens_on_loopback
from .requests import Served, check_chat, error_body


def _openai_errors(app) -> None:
    """OpenAI's error JSON for what transformers' app raises: HTTP errors keep their status, a request FastAPI
    cannot parse is a 400, anything else a 500 `server_error` (the traceback goes to the server's log only)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    async def http_error(request, exc: HTTPException):
        status = 400 if exc.status_code == 422 else exc.status_code  # OpenAI: an unknown field is a 400
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=status)

    async def unparsed(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": str(exc)}
        return JSONResponse(error_body(f"the request body does not parse: {first['msg']}"), status_code=400)

    async def crash(request, exc: Exception):
        return JSONResponse(error_body(f"the server failed on this request: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)  # fmt: skip

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, unparsed)
    app.add_exception_handler(Exception, crash)


class Pinned:
    """transformers serve for the model in `folder` alone, listed under the name `str(folder)`; requests may also
    name it by its folder's name (`merged`) or absolute path. `device`: transformers serve's `--device` (auto, cpu,
    cuda:0); `api_key`: the key every route but GET /health requires (None: no key)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                 log_level: str = "warning", api_key: str | None = None):  # fmt: skip
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from transformers.cli.serve import Serve

        from .model import context_length

        class _Built(Serve):
            def start_server(self):  # Serve calls this once the app is built (non_blocking): serve it later
                pass

        lenient.install()  # a reply that does not parse (a malformed tool call) is text, not a 500
        name = str(folder)
        self.serve = _Built(force_model=name, host=host, port=port, device=device, log_level=log_level,
                            non_blocking=True)  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if not tokenizer.chat_template:
            from ..core.errors import UserError

            raise UserError(f"{folder} has no chat template: serve models/merged (merge writes the training one)")
        generation = GenerationConfig.from_pretrained(folder).to_diff_dict()
        generation.pop("transformers_version", None)
        self.served = Served(name, tokenizer, context_length(AutoConfig.from_pretrained(folder, trust_remote_code=False)),
                             {folder.name, str(folder.resolve())}, generation)  # fmt: skip
        config = self.serve.server.config
        _openai_errors(config.app)
        config.app = Guard(config.app, lambda body: check_chat(body, self.served), listens_on_loopback(host),
                           api_key)  # fmt: skip

    def run(self) -> None:
        """Serve in this thread until Ctrl-C or SIGTERM."""
        self.serve.server.run()

    def start(self) -> None:
        """Serve from a background thread; `stop()` ends it."""
        from transformers.cli.serve import Serve

        Serve.start_server(self.serve)

    def stop(self) -> None:
        self.serve.kill_server()
