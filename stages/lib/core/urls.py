"""URLs as messages show them: credentials masked, and a check that a URL can be parsed at all.

A URL in params may carry a password (`http://user:pass@host/x`) or a token in its query (`?token=...`); every
message that shows a URL goes through `mask_url` / `mask_urls`, which never raise, whatever the text.
"""

from __future__ import annotations

import re

URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def mask_url(url: str) -> str:
    """`url` with its userinfo (`user:pass@`) and every query value replaced by `***`; plain string work, so a
    malformed URL is masked as well as a good one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # a password may hold "/" or "#" (a user's typo or an unescaped secret): everything up to the last "@" before
    # the query is masked, even if that hides a path that has an "@" in it
    head = rest.split("?", 1)[0]
    if "@" in head:
        rest = "***@" + rest[head.rfind("@") + 1 :]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    tail, hsep, fragment = tail.partition("#")
    path, qsep, query = tail.partition("?")
    if qsep:
        path += "?" + _mask_fields(query)
    if hsep:  # tokens in a fragment (#access_token=...) are masked the same way
        path += "#" + (_mask_fields(fragment) if "=" in fragment else fragment)
    return f"{scheme}{sep}{netloc}{path}"


def _mask_fields(text: str) -> str:
    """`a=1&b=2` → `a=***&b=***` (a field without `=` becomes `***`)."""
    return "&".join(f"{k}=***" if eq else "***" for k, eq, _ in (p.partition("=") for p in text.split("&")))


def mask_urls(text: str) -> str:
    """Every URL in `text` masked (for messages that quote another library's error, which may hold the URL)."""
    return URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), text)


def url_problem(url: str) -> str | None:
    """Why `url` cannot be an http(s) download address (None when it can): urllib's own parse, as httpx's is stricter
    still, so what passes here at least splits into a host and a path."""
    from urllib.parse import urlsplit

    if any(ord(c) < 32 or ord(c) == 127 for c in url):  # a space is fine: httpx sends it as %20
        return "it holds a control character (a tab or a line break?)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: a bad one raises here)
    except ValueError as exc:
        return str(exc)
    if parts.scheme.lower() not in ("http", "https"):
        return "it must start with http:// or https://"
    if not parts.hostname:
        return "it names no host"
    return None
