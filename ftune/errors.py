"""The one exception type that means "the user can fix this": the CLI prints it without a traceback and exits 2."""

from __future__ import annotations


class FtuneError(Exception):
    """A problem in the user's input (recipe, data, paths, options), one line per problem."""

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


MAX_LISTED_PROBLEMS = 10


def raise_problems(problems: list[str]) -> None:
    """Raise one FtuneError listing the first problems (and how many more there are), if any."""
    if not problems:
        return
    extra = len(problems) - MAX_LISTED_PROBLEMS
    raise FtuneError(*problems[:MAX_LISTED_PROBLEMS], *([f"... and {extra} more problems"] if extra > 0 else []))
