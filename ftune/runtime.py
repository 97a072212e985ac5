"""Process-wide settings for the heavy commands: keep third-party logging to what a user needs."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Silence load-time chatter (weight-loading bars, optional-kernel notices) that buries ftune's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
