"""The SD VAE (diffusers.AutoencoderKL) wrapper: images in [-1,1] <-> scaled latents, loadable offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
KNOWN_VAES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
SD_SCALE_FACTOR = 0.18215


class VAEUnavailableError(RuntimeError):
    """The VAE weights are neither local nor downloadable: the message says what to fetch and which key to set."""


def _missing_message(vae: str, reason: str) -> str:
    """One place for the 'what to download and where to point the config' text."""
    folder = vae.split("/")[-1]
    return (
        f"Cannot load the VAE {vae!r}: {reason}.\n"
        f"  Fix: on a machine with internet run `make assets` (python -m datamodules.assets), which downloads "
        f"{vae} into data/assets/{folder}; copy that folder here and set "
        f"data.vae_local_path=/path/to/{folder} (config key vae_local_path in conf/data/latent_imagenet.yaml). "
        f"Alternatively pre-fill the Hugging Face cache and set HF_HUB_OFFLINE=1."
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE semantics, read at call time (huggingface_hub reads it only at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub, so an offline node fails in seconds instead of waiting on retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_vae_available(vae: str = DEFAULT_VAE, local_path: str | os.PathLike | None = None) -> None:
    """Cheap early check (no weights loaded) so a run fails at start-up, not at its first decode."""
    if local_path:
        folder = Path(local_path).expanduser()
        if not ((folder / "config.json").is_file() or (folder / "vae" / "config.json").is_file()):
            raise VAEUnavailableError(
                _missing_message(vae, f"data.vae_local_path={str(local_path)!r} has no config.json (not a VAE folder)")
            )
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(vae, "config.json"), str):
        return
    if _hub_offline():
        raise VAEUnavailableError(_missing_message(vae, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise VAEUnavailableError(
            _missing_message(vae, "it is not in the local Hugging Face cache and the hub is unreachable (no network)")
        )


def load_autoencoder(vae: str = DEFAULT_VAE, local_path: str | os.PathLike | None = None):
    """AutoencoderKL from a local folder, else the hub cache, else the hub; fails at once when none works."""
    from diffusers import AutoencoderKL

    if local_path:
        folder = Path(local_path).expanduser()
        if (folder / "vae" / "config.json").is_file():  # a full Stable Diffusion pipeline folder
            folder = folder / "vae"
        if not (folder / "config.json").is_file():
            raise VAEUnavailableError(
                _missing_message(vae, f"data.vae_local_path={str(local_path)!r} has no config.json (not a VAE folder)")
            )
        try:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as err:  # re-raised with the fix attached
            raise VAEUnavailableError(
                _missing_message(vae, f"the folder {str(folder)!r} could not be loaded ({type(err).__name__}: {err})")
            ) from err
    try:
        return AutoencoderKL.from_pretrained(vae, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as cached_err:  # not in the local hub cache; try the network below
        if _hub_offline():
            raise VAEUnavailableError(
                _missing_message(vae, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
            ) from cached_err
    if not _hub_reachable():
        raise VAEUnavailableError(
            _missing_message(vae, "it is not in the local Hugging Face cache and the hub is unreachable (no network)")
        )
    try:
        return AutoencoderKL.from_pretrained(vae, low_cpu_mem_usage=False)
    except Exception as err:  # re-raised with the fix attached
        raise VAEUnavailableError(_missing_message(vae, f"download failed ({type(err).__name__}: {err})")) from err


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU (fast, as the issue asks) and fp32 on CPU (bf16 convs are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ValueError(f"vae dtype {dtype!r} is not one of {['auto', *table]}")
    return table[dtype]


class VAE:
    """Frozen AutoencoderKL plus the latent scale factor: encode(images)->latents, decode(latents)->images."""

    def __init__(self, vae=DEFAULT_VAE, *, local_path=None, scale_factor: float = SD_SCALE_FACTOR,
                 device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
                 name: str | None = None):
        from diffusers import AutoencoderKL

        if isinstance(vae, AutoencoderKL):
            model = vae
            self.name = name or "custom-AutoencoderKL"
        elif isinstance(vae, str):
            model = load_autoencoder(vae, local_path)
            self.name = name or vae
        else:
            raise TypeError(f"vae must be a hub id, or a diffusers AutoencoderKL; got {type(vae).__name__}")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(dtype, self.device)
        if next(model.parameters()).dtype != self.dtype:  # avoid a needless cast (diffusers warns about it)
            model = model.to(dtype=self.dtype)
        self.model = model.to(device=self.device).eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.latent_channels = int(model.config.latent_channels)
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)

    def to(self, device: str | torch.device) -> VAE:
        """Move the weights (used to follow the training module's device for decode)."""
        self.device = torch.device(device)
        if self.device.type != "cuda" and self.dtype == torch.bfloat16:
            self.dtype = torch.float32
            self.model.to(dtype=self.dtype)
        self.model.to(device=self.device)
        return self

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and std (float32, on the input's device) of images in [-1, 1]."""
        dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().to(images.device), dist.std.float().to(images.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Scaled latents: posterior mean (or a posterior sample) times scale_factor."""
        mean, std = self.encode_moments(images)
        if sample:
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images in [-1, 1] on the latents' device."""
        out = self.model.decode((latents / self.scale_factor).to(self.device, self.dtype)).sample
        return out.float().clamp_(-1.0, 1.0).to(latents.device)


def build_tiny_autoencoder(levels: int = 2, seed: int = 0):
    """A randomly initialised, very small AutoencoderKL (downsampling 2**(levels-1)) for tests and CPU benchmarks."""
    from diffusers import AutoencoderKL

    widths = tuple(8 * 2 ** min(i, 1) for i in range(levels))  # (8, 16, 16, ...)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
            block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32,
        )
