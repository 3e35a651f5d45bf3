"""The daemons' log lines: one line per event on stderr, ``key=value`` pairs (logfmt), which journald keeps and
``journalctl -o cat`` or any logfmt reader splits.

Each line is ``ts=<UTC ISO 8601> level=<LEVEL> logger=<name>`` followed by the event's own pairs, such as
``event=server_down server=s1 reason=health``. A value that is empty or holds a space, a quote, ``=`` or a
control character is written as a double-quoted JSON string (:func:`value`), so a line always splits the same way
whatever a configuration names its servers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TextIO

__all__ = ["setup", "value"]

_PLAIN = re.compile(r"[^\s\"=\\\x00-\x1f\x7f]+")


def value(item: object) -> str:
    """``item`` as a logfmt value: bare when it is one plain word, quoted (JSON string escapes) otherwise."""
    text = str(item)
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


def setup(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send every log record to ``stream`` (stderr) as one logfmt line."""
    formatter = logging.Formatter(
        "ts=%(asctime)s.%(msecs)03dZ level=%(levelname)s logger=%(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler])
