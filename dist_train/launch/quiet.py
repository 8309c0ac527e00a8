"""Third-party libraries' own output (transformers' warnings and loading bars) from workers:
said once, by rank 0, not once per rank and interleaved."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# What the libraries read from the environment when they load: transformers' logger level, and
# huggingface_hub's progress-bar switch, which transformers' own bars follow.
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def quiet_other_ranks(environ: MutableMapping[str, str] = os.environ) -> None:
    """In a worker other than rank 0, the libraries' warnings and bars off. Called first thing
    in a worker, before they load (they read these then) and before torch loads (so it reads
    torchrun's RANK itself, not through `env.DistEnv`); a user's own setting wins."""
    if environ.get("RANK", "0") != "0":
        for name, value in QUIET_LIBRARIES.items():
            environ.setdefault(name, value)
