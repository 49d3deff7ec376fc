"""One exception type for every user mistake: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A bad input (missing file, wrong model, impossible value); the message names the problem and the fix."""


class NotBuiltError(UserError):
    """A stage whose method is not implemented yet; the CLI says so plainly and exits non-zero."""
