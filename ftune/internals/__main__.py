"""``python -m ftune.internals > docs/internals.md``: the table for people."""

from ftune.internals import render_markdown

print(render_markdown(), end="")
