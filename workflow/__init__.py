"""The training workflow around the math: start-up checks, hardware facts, signals, sweeps (no torch at import)."""
