"""Names that come from outside: the tenant/source name rule, and text JSON can carry.

One rule for tenant (and webhook source) names everywhere they enter: webhook URLs, inbox
directories, replay plans. File names and command-line arguments are bytes on POSIX; Python
holds undecodable bytes as lone surrogates, which no JSON document (checkpoint, health, DLQ)
and no UTF-8 output can carry: `representable` tells them apart, `shown` escapes them.
"""

from __future__ import annotations

import re

NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME_RULE_TEXT = "1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"


def valid_name(name: str) -> bool:
    """A tenant (or webhook source) name as the service accepts it."""
    return NAME_RULE.match(name) is not None


def representable(text: str) -> bool:
    """True when the text is valid Unicode without lone surrogates (i.e. was UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """The text with undecodable bytes written as \\xNN, safe in JSON and on a terminal."""
    if representable(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
