"""One exception type for every user mistake: the CLI prints its message as one line and exits 2."""

import re


class UserError(Exception):
    """A bad input (missing file, wrong model, impossible value); the message names the problem and the fix."""


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C inside a stage of ``yolocomp run``: the CLI names the stage and how to resume."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


#: Decorations libraries put into their messages (Ultralytics' "ERROR ❌️", colour codes) that read as noise after
#: yolocomp's own wording.
_NOISE = re.compile(r"\x1b\[[0-9;]*m|(?:ERROR|WARNING)\s*[❌⚠]\ufe0f?|[❌⚠]\ufe0f?")


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (libraries often raise multi-line ones), without the
    libraries' decorations, or its type name; errors we show stay one line."""
    lines = [" ".join(_NOISE.sub("", ln).split()) for ln in str(error).splitlines()]
    lines = [ln for ln in lines if ln]
    return (lines[0] if lines else type(error).__name__)[:limit]
