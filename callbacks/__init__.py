"""callbacks: Trainer callbacks hooked in through conf/callbacks/."""

from .last_checkpoint import LastCheckpoint
from .sample_grid import SampleGrid

__all__ = ["LastCheckpoint", "SampleGrid"]
