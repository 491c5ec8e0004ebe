"""The VAE preset table: conf/data/vae/<name>.yaml (hub id, subfolder, revision, scale, shift, channels, downsample).

Read without importing torch, so `make assets` and config checks stay fast.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "conf" / "data" / "vae"
PRESET_KEYS = ("name", "hub_id", "subfolder", "revision", "scale", "shift", "channels", "downsample")


def vae_presets() -> list[str]:
    """Names of the VAE presets (conf/data/vae/*.yaml), for messages and `make assets`."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def vae_preset(name: str) -> dict:
    """One preset as a plain dict (the same node Hydra puts at data.vae)."""
    import yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"data/vae={name!r} is not one of {vae_presets()}")
    return yaml.safe_load(path.read_text())


def check_preset(preset: dict) -> dict:
    """A data.vae node with every key, or one line naming the missing/unknown keys."""
    missing = [k for k in PRESET_KEYS if k not in preset]
    unknown = [k for k in preset if k not in PRESET_KEYS]
    if missing or unknown:
        raise ValueError(f"data.vae needs the keys {list(PRESET_KEYS)}; missing {missing}, unknown {unknown}")
    if float(preset["scale"]) <= 0 or int(preset["channels"]) < 1 or int(preset["downsample"]) < 1:
        raise ValueError(f"data.vae.scale, .channels and .downsample must be positive, got {preset}")
    return dict(preset)
