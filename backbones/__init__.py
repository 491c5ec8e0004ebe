"""Networks: DiT with the official state_dict layout, presets, and a checkpoint loader."""

from backbones.checkpoint import load_dit_checkpoint
from backbones.dit import DIT_PRESETS, DiT, dit_preset

__all__ = ["DIT_PRESETS", "DiT", "dit_preset", "load_dit_checkpoint"]
