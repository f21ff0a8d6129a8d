"""The one exception type users see: what went wrong, and what to do about it."""

from __future__ import annotations


class SlimformerError(Exception):
    """A user-facing error. `hint` says what to do; the CLI prints both, never a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class PassError(SlimformerError):
    """A pass broke the graph or its numerics; names the pass."""

    def __init__(self, pass_name: str, message: str, hint: str | None = None):
        super().__init__(f"pass '{pass_name}' failed: {message}", hint)
        self.pass_name = pass_name
