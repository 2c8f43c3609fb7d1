"""Model sources that need no download: the embedded ``tiny`` model and random-weight presets."""

from .configs import PRESETS, preset_config
from .materialize import materialize_preset

__all__ = ["PRESETS", "preset_config", "materialize_preset"]
