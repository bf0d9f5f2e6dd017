"""A reply the response template cannot parse (a tool call that is not JSON) is returned as text, not a 500.

transformers serve (5.24) splits a reply into reasoning, tool calls and content with the model's response template;
when the model writes a malformed call, its parser raises ValueError: the non-streaming path answers 500 and the
streaming path ends in an error event. A tuned model that sometimes botches a call is a fact of life, so `install()`
wraps both places once: a reply that does not parse comes back as its plain text (special tokens dropped) in
`content`, with no tool_calls, as a server without a response template would answer.
"""

from __future__ import annotations

_INSTALLED = False


class _LenientParser:
    """A ResponseParser that, after the first chunk it cannot parse, passes the rest through as content."""

    def __init__(self, parser):
        self._parser, self._broken = parser, False

    def feed(self, text: str) -> list[dict]:
        if not self._broken:
            try:
                return self._parser.feed(text)
            except ValueError:
                self._broken = True
        return [{"type": "region_chunk", "field": "content", "text": text}]

    def finalize(self):
        if self._broken:
            return {}, []
        return self._parser.finalize()

    def __getattr__(self, name):  # initial_events and whatever else transformers reads
        return getattr(self._parser, name)


def install() -> None:
    """Wrap transformers serve's reply parsing (both paths) once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    from transformers.cli.serving import chat_completion

    parse, build = chat_completion.parse_assistant_message, chat_completion.build_response_parser

    def parse_or_text(processor, model, generated_ids, input_ids, cleaned_content: str = "", tools=None):
        try:
            return parse(processor, model, generated_ids, input_ids, cleaned_content=cleaned_content, tools=tools)
        except ValueError:
            return cleaned_content, None, None

    def lenient_parser(*args, **kwargs):
        parser = build(*args, **kwargs)
        return None if parser is None else _LenientParser(parser)

    chat_completion.parse_assistant_message = parse_or_text
    chat_completion.build_response_parser = lenient_parser
    _INSTALLED = True
