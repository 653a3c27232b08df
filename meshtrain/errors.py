"""User-facing errors: each line names the file or TOML key, the value and what would fix it.

The CLI turns a `UserError` into exit status 2 and a short message (no traceback unless
MESHTRAIN_DEBUG=1). Plugins raise these too, for their own keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix: bad config, missing file, bad arguments. One line per problem."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    """One or more problems in the TOML configuration."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a
    library's error is quoted inside a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
