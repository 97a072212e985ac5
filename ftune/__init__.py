"""ftune: one validated YAML recipe for the whole fine-tuning lifecycle (train, eval, merge, export)."""

__version__ = "0.1.0"
