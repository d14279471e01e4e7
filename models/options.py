"""`key(default, help)`: a config field with its help text, for the config sections (asv/config.py) and each
model's own `Options`. The help is field metadata, which `asv.config.reference` reads for `--help` and
docs/config.md: nothing parses source."""
from __future__ import annotations

import copy
from dataclasses import field


def key(default, help: str):
    """A dataclass field with `default` (a list or dict is copied for each instance) and its help text."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
