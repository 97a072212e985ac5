"""The ``ftune`` command line: each lifecycle stage is a subcommand over one recipe or one run directory.

Thin by design: parse options, load the recipe or run directory, make one core call, say where the
output went. Heavy libraries are imported inside the commands that need them so ``ftune --help``
and ``ftune validate`` stay instant. User errors print one line each and exit 2, no traceback
unless ``--debug``.

The app and what every command shares (``app``: options, the user-error wrapper) are in ``app``; the
commands are grouped by what they take: a recipe (``recipe_commands``), a run directory
(``run_commands``), or nothing (``info_commands``). Importing this package registers all of them.
"""

from ftune.cli.app import app, main

# Each module registers its commands on app when imported; ``ftune --help`` lists them in this order.
from ftune.cli import recipe_commands  # noqa: E402, F401  isort: skip
from ftune.cli import run_commands  # noqa: E402, F401  isort: skip
from ftune.cli import info_commands  # noqa: E402, F401  isort: skip

__all__ = ["app", "main"]
