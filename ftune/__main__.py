"""Allow ``python -m ftune`` as an alias of the ``ftune`` console script."""

from ftune.cli import main

main()
