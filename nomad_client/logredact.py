"""Redaction of secrets in log records: the one place that keeps credentials out of the log.

A ``logging.Filter`` installed on the root logger's handlers at agent start, so it sees every
record the agent writes, whichever library logged it. It rewrites the formatted message, the
formatted traceback and any stack text, replacing:

* JWT-shaped strings (``eyJ…`` and two more base64url parts): workload identities;
* the values of ``X-Nomad-Token`` and ``Authorization`` (after an optional scheme such as
  ``Bearer``), in header, ``key=value`` and dict-repr form;
* UUID-shaped values after token-ish keys (``token=``, ``SecretID:``, ``secret_id='…'``):
  ACL secret IDs;
* PEM private-key blocks: the signing key.

A handler filter runs only for records that are actually emitted, so it costs nothing on a
request that logs nothing.
"""

from __future__ import annotations

import logging
import re

REDACTED = "<redacted>"

_JWT = r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
_UUID = r"[0-9A-Fa-f]{8}-(?:[0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}"
_PEM_KEY = r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"
# Key, then a separator as found in headers ("X-Nomad-Token: v"), queries ("token=v") and
# reprs ("'SecretID': 'v'"); the value stops at whitespace, quotes, separators and the
# backslash of an escaped byte in a bytes repr.
_SEP = r"""['"]?\s*[:=]\s*(?:b(?=['"]))?['"]?"""
_HEADER_VALUE = (r"(?P<hkey>x-nomad-token|authorization)(?P<hsep>" + _SEP
                 + r"""(?:(?:bearer|basic|token)\s+)?)[^\s'",;&\\]+""")
_KEYED_UUID = r"(?P<ukey>(?:token|secret)[\w-]*" + _SEP + ")" + _UUID

_SECRETS = re.compile("|".join(
    f"(?P<{name}>{pattern})" for name, pattern in (
        ("pem", _PEM_KEY), ("jwt", _JWT), ("header", _HEADER_VALUE), ("keyed", _KEYED_UUID))),
    re.IGNORECASE | re.DOTALL)


def _replace(match: re.Match[str]) -> str:
    if match.group("header") is not None:
        return match.group("hkey") + match.group("hsep") + REDACTED
    if match.group("keyed") is not None:
        return match.group("ukey") + REDACTED
    return REDACTED


def redact(text: str) -> str:
    """``text`` with every secret-shaped part replaced (the same object if there is none)."""
    if _SECRETS.search(text) is None:
        return text
    return _SECRETS.sub(_replace, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record in place before any handler formats it; never drops one.

    The message is formatted here (and its arguments dropped) because a secret may be in
    the arguments; the traceback is formatted here because exception messages often quote
    the raw input that carried the secret.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean is not message or record.args:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add the filter to every handler of ``logger`` (the root logger by default): records
    from every library propagate there. Idempotent."""
    target = logger if logger is not None else logging.getLogger()
    for handler in target.handlers:
        for existing in handler.filters:
            if isinstance(existing, RedactingFilter):
                break
        else:
            handler.addFilter(_FILTER)
    return _FILTER


_FILTER = RedactingFilter()
