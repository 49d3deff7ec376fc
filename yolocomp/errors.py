"""One exception type for every user mistake: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """A bad input (missing file, wrong model, impossible value); the message names the problem and the fix."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (libraries often raise multi-line ones), or its type name;
    errors we show stay one line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]
