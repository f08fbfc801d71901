"""The one exception type a user sees: its message is a single line that names what is wrong."""

import difflib


class SqueezeError(Exception):
    """Bad input or a failed stage, explained in one line (the CLI prints it without a traceback)."""


def did_you_mean(word: str, choices) -> str:
    """'; did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:
        lowered = {str(c).lower(): str(c) for c in choices}
        if str(word).lower() in lowered:
            close = [lowered[str(word).lower()]]
    return f"; did you mean '{close[0]}'?" if close and close[0] != str(word) else ""


class DamagedFile(SqueezeError):
    """A file squeeze reads is truncated or corrupt. The reader names the problem; whoever knows
    where the file came from may give a better `remedy` (the runner names the stage that makes it)."""

    def __init__(self, path, problem: str, remedy: str = "delete it and rerun"):
        self.path, self.problem, self.remedy = path, problem, remedy
        super().__init__(path, problem, remedy)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.remedy}"
