"""Model sources that need no download: the embedded ``tiny`` model and random-weight presets
of every official Qwen3-VL shape (``NAME:N``: the same shape cut to its first N text layers)."""

from .configs import OFFICIAL, PRESETS, is_preset, preset_config
from .materialize import materialize_preset

__all__ = ["OFFICIAL", "PRESETS", "is_preset", "preset_config", "materialize_preset"]
