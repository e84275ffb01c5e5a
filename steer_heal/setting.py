"""One declared setting: a dataclass field with its default, its help text and the modes that read
it. Every settings dataclass uses it (config.py, reward.RewardConfig, engine.VLLMConfig), so the
online recipe's flat arguments carry the same help (config.flat_dataclass)."""
from __future__ import annotations

import copy
from dataclasses import field

ITERATIVE, ONLINE = "iterative", "online"
BOTH = (ITERATIVE, ONLINE)


def setting(default, help: str, modes: tuple[str, ...] = BOTH):
    """The iterative loop reads a setting as `section.name`, the online recipe as the flat `name`."""
    meta = {"help": help, "modes": modes}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return field(default=default, metadata=meta)
