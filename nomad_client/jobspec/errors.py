"""Error types raised by the jobspec package.

Pure value types: nothing here touches files, the network or the event loop.
"""

from __future__ import annotations

import attrs


@attrs.define(auto_exc=True, eq=False)
class JobspecError(Exception):
    """A jobspec could not be parsed or decoded.

    ``line`` is 1-based and ``None`` when no source position is known (for
    example for a variable supplied on the command line).
    """

    filename: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.filename}: {self.message}"
        return f"{self.filename}:{self.line}: {self.message}"


@attrs.define(auto_exc=True, eq=False)
class JobValidationError(Exception):
    """A job (parsed or posted as JSON) failed validation after canonicalization.

    ``problems`` lists every problem found, so a user can fix them all at once.
    """

    message: str
    problems: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.message
