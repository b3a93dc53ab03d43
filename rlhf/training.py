"""Small pieces the Trainer-based stages (SFT, reward) share."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_transformers() -> None:
    """Keep the terminal readable: our own progress bars, not one per weight file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def world_info() -> dict[str, Any]:
    """World size as torchrun/accelerate set it (1 for a plain `python` run)."""
    return {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "rank": int(os.environ.get("RANK", "0"))}
