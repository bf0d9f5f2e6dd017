"""`python -m stages.chat`: talk to the tuned model in the terminal, with the prompt it was trained on.

Loads models/merged (or, with `--adapter models/adapter`, models/base + the adapter unmerged, through PEFT) and
answers each line typed, streaming the tokens as they come. The conversation so far is the prompt of each turn,
built with the chat template models/merged carries (as a server and eval build it), and an answer ends at a stop
token of its generation_config.json. `/reset` forgets the conversation (the `--system` text stays), `/exit` or
Ctrl-D ends; Ctrl-C stops an answer being written.

A line that ends in a backslash goes on with the next one, so a turn can hold line breaks (the toy task's
prompts are two lines: `Translate into Chinese.\\`, then `grey panda`). When standard input is not a terminal (a
pipe, a file), its lines are the turns and standard output gets each answer on a line of its own and nothing else
(notes go to stderr), for scripts and tests.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from stages.lib.core.errors import UserError, run_command
from stages.lib.serve import model as talk

HELP = "/reset forgets the conversation, /exit or Ctrl-D ends, Ctrl-C stops an answer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=talk.MERGED, help="a whole model with the training tokenizer "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter (models/adapter) to put on --base, unmerged, "
                        "instead of --model")  # fmt: skip
    parser.add_argument("--base", type=Path, default=talk.BASE, help="with --adapter (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=talk.TRAINING_TOKENIZER,
                        help="with --adapter: the training tokenizer (default: %(default)s)")  # fmt: skip
    parser.add_argument("--system", default=None, help="a system text before the conversation (templates with a "
                        "system format)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, as eval; above 0: "
                        "sampled at that temperature")  # fmt: skip
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if not 0 <= args.temperature <= 100:
        parser.error(f"--temperature must be 0 (greedy) or a positive number, not {args.temperature}")
    return args


def raw_lines(interactive: bool):
    """The lines typed (interactive: with line editing and a prompt) or read from standard input."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    try:
        importlib.import_module("readline")  # input() gets line editing and history
    except ImportError:
        pass
    prompt = "you> "
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the end
            print(file=sys.stderr)
            return
        prompt = "...> " if line.endswith("\\") else "you> "
        yield line


def user_turns(lines):
    """Turns from lines: a line ending in a backslash goes on with the next line (the backslash becomes a line
    break), so a turn can hold several lines: `Translate into Chinese.\\` then `grey panda`."""
    pending = []
    for line in lines:
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        yield "\n".join(pending + [line])
        pending = []
    if pending:
        yield "\n".join(pending)


def chat(talker: talk.Talker, turns, system: str | None, max_new_tokens: int, temperature: float,
         interactive: bool) -> None:  # fmt: skip
    """Answer each of `turns`, streaming the answer to stdout, keeping the conversation as the prompt."""
    from transformers import TextStreamer

    from stages.lib.chat import reply
    from stages.lib.chat.stream import ReadableStream

    class Shown(TextStreamer):  # prints the reply as a person reads it: reasoning and tool calls marked
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.readable = ReadableStream()

        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(self.readable.feed(text), end="", flush=True)

    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    refused = asked = 0
    for text in turns:
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            print("(a new conversation)", file=sys.stderr, flush=True)
            continue
        if not command:
            continue
        turn = messages + [{"role": "user", "content": text}]
        asked += 1
        try:
            ids = talk.prompt_ids(talker.tokenizer, turn)
            if interactive:
                print("model> ", end="", flush=True)
            streamer = Shown(talker.tokenizer)
            new = talk.reply(talker, ids, max_new_tokens, temperature, streamer)
            answer = reply.parse(talker.tokenizer, new, talker.stop_ids, ids)
            print(streamer.readable.finish(answer), flush=True)
        except UserError as exc:  # this turn cannot be answered; the conversation stays as it was
            print(f"error: {exc}", file=sys.stderr, flush=True)
            refused += 1
            if not interactive:  # piped: an empty answer line keeps the answers in step with the turns
                print(flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C while answering: drop the turn, keep the conversation
            print("\n(stopped; this turn is forgotten)", file=sys.stderr, flush=True)
            continue
        if not set(new) & set(talker.stop_ids):
            print(f"(cut at --max-new-tokens {max_new_tokens} or the context)", file=sys.stderr, flush=True)
        said = {"role": "assistant", "content": answer.content}  # the history a client keeps: no reasoning
        messages = turn + [said | ({"tool_calls": answer.tool_calls} if answer.tool_calls else {})]
    if refused and not interactive:  # a script reading the answers must not take them all for answered
        raise UserError(f"{refused} of {asked} turns got no answer (an empty line on standard output each; the "
                        "reason is on standard error above)")


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging as transformers_logging

    from stages.lib.core.quiet import quiet

    quiet()
    transformers_logging.disable_progress_bar()  # the weights of a chat model load in seconds
    args = parse_args(argv)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"loading {args.adapter or args.model} ...", file=sys.stderr, flush=True)
    talker = talk.load_with_adapter(args.adapter, args.base, args.tokenizer) if args.adapter else talk.load_merged(args.model)
    if interactive:
        how = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
        print(f"chat with {talker.name} ({how}, up to {args.max_new_tokens} new tokens); {HELP}", file=sys.stderr)
    chat(talker, user_turns(raw_lines(interactive)), args.system, args.max_new_tokens, args.temperature, interactive)


if __name__ == "__main__":
    run_command(main)
