"""The latent VAE (diffusers.AutoencoderKL) wrapper: images in [-1,1] <-> (z - shift) * scale, loadable offline.

Presets (conf/data/vae/*.yaml) name the weights and their latent normalisation, as the pipelines that trained
on them do: SD 1.x VAEs x0.18215, SDXL x0.13025, SD3 (z - 0.0609) x1.5305 and FLUX.1 (z - 0.1159) x0.3611
with 16 latent channels. `weights_info` records what was really loaded (hub id + revision, or the local path)
plus a sha256 of the weights, so a latent cache can say which encoder produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_SCALE_FACTOR = 0.18215
# name -> torch dtype of the weights and activations; "float32" also turns TF32 off (exact fp32, DiT's encode
# precision up to TF32), "tf32" keeps fp32 storage with TF32 convolutions/matmuls on Ampere+ GPUs.
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VAEUnavailableError(RuntimeError):
    """The VAE weights are neither local nor downloadable: the message says what to fetch and which key to set."""


def _missing_message(vae: str, reason: str) -> str:
    """One place for the 'what to download and where to point the config' text."""
    folder = vae.split("/")[-1]
    return (
        f"Cannot load the VAE {vae!r}: {reason}.\n"
        f"  Fix: on a machine with internet run `make assets` (python -m datamodules.assets), which downloads "
        f"the VAE presets into data/assets/<preset>; copy that folder here and set "
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


def _local_folder(local_path: str | os.PathLike, subfolder: str | None = None) -> Path | None:
    """The folder holding config.json: the path itself, or its VAE subfolder (a full pipeline folder)."""
    folder = Path(local_path).expanduser()
    for candidate in (folder, folder / (subfolder or "vae"), folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def check_vae_available(vae: str = DEFAULT_VAE, local_path: str | os.PathLike | None = None,
                        subfolder: str | None = None) -> None:
    """Cheap early check (no weights loaded) so a run fails at start-up, not at its first decode."""
    if local_path:
        if _local_folder(local_path, subfolder) is None:
            raise VAEUnavailableError(
                _missing_message(vae, f"data.vae_local_path={str(local_path)!r} has no config.json (not a VAE folder)")
            )
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(vae, "config.json" if not subfolder else f"{subfolder}/config.json"), str):
        return
    if _hub_offline():
        raise VAEUnavailableError(_missing_message(vae, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise VAEUnavailableError(
            _missing_message(vae, "it is not in the local Hugging Face cache and the hub is unreachable (no network)")
        )


def _hub_revision(vae: str, subfolder: str | None) -> str | None:
    """The commit hash of the cached snapshot from_pretrained loaded (its folder name under snapshots/)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(vae, "config.json" if not subfolder else f"{subfolder}/config.json")
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def load_autoencoder(vae: str = DEFAULT_VAE, local_path: str | os.PathLike | None = None,
                     subfolder: str | None = None, revision: str | None = None):
    """AutoencoderKL from a local folder, else the hub cache, else the hub; fails at once when none works."""
    return _load_autoencoder(vae, local_path, subfolder, revision)[0]


def _load_autoencoder(vae: str, local_path, subfolder, revision) -> tuple[object, dict]:
    """(model, where it came from): {'local_path': ...} or {'hub_id', 'subfolder', 'revision'}."""
    from diffusers import AutoencoderKL

    if local_path:
        folder = _local_folder(local_path, subfolder)
        if folder is None:
            raise VAEUnavailableError(
                _missing_message(vae, f"data.vae_local_path={str(local_path)!r} has no config.json (not a VAE folder)")
            )
        try:
            model = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as err:  # re-raised with the fix attached
            raise VAEUnavailableError(
                _missing_message(vae, f"the folder {str(folder)!r} could not be loaded ({type(err).__name__}: {err})")
            ) from err
        return model, {"source": "local", "local_path": str(folder.resolve())}
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if revision:
        kwargs["revision"] = revision
    where = {"source": "hub", "hub_id": vae, "subfolder": subfolder}
    try:
        model = AutoencoderKL.from_pretrained(vae, local_files_only=True, low_cpu_mem_usage=False, **kwargs)
        return model, {**where, "revision": _hub_revision(vae, subfolder) or revision}
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
        model = AutoencoderKL.from_pretrained(vae, low_cpu_mem_usage=False, **kwargs)
    except Exception as err:  # re-raised with the fix attached
        raise VAEUnavailableError(_missing_message(vae, f"download failed ({type(err).__name__}: {err})")) from err
    return model, {**where, "revision": _hub_revision(vae, subfolder) or revision}


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the same weights give the same hash anywhere."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Names of DTYPES -> torch dtype; fp32 is the default (bf16 encodes differ ~80x the fp16 storage rounding)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"data.vae_dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_config_factor(model, key: str, want: float, config_key: str) -> None:
    """A preset whose scale/shift disagrees with the weights' own config.json describes other weights: fail."""
    config = dict(model.config)
    if key in (config.get("_use_default_values") or []) or config.get(key) is None:
        return  # not stated by the weights' config.json
    have = float(config[key])
    if not math.isclose(have, want, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(
            f"{config_key}={want} but the loaded VAE's config.json says {key}={have}: pick the preset that matches "
            f"these weights (data/vae=sd-vae-ft-ema|sd-vae-ft-mse|sdxl|sd3|flux) or set {config_key}={have}"
        )


class VAE:
    """Frozen AutoencoderKL with its latent normalisation: encode -> (z - shift) * scale, decode inverts it."""

    def __init__(self, vae=DEFAULT_VAE, *, local_path=None, scale_factor: float = SD_SCALE_FACTOR,
                 shift_factor: float = 0.0, device: str | torch.device | None = None,
                 dtype: str | torch.dtype = "float32", name: str | None = None, subfolder: str | None = None,
                 revision: str | None = None):
        from diffusers import AutoencoderKL

        if isinstance(vae, AutoencoderKL):
            model, where = vae, {"source": "in-memory AutoencoderKL"}
            self.name = name or "custom-AutoencoderKL"
        elif isinstance(vae, str):
            model, where = _load_autoencoder(vae, local_path, subfolder, revision)
            self.name = name or vae
        else:
            raise TypeError(f"vae must be a hub id, or a diffusers AutoencoderKL; got {type(vae).__name__}")
        _check_config_factor(model, "scaling_factor", float(scale_factor), "data.vae.scale")
        _check_config_factor(model, "shift_factor", float(shift_factor), "data.vae.shift")
        self.weights_info = {**where, "sha256": weights_sha256(model)}
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
        self.dtype = _resolve_dtype(dtype)
        if next(model.parameters()).dtype != self.dtype:  # avoid a needless cast (diffusers warns about it)
            model = model.to(dtype=self.dtype)
        self.model = model.to(device=self.device).eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
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

    @contextlib.contextmanager
    def _precision(self):
        """dtype 'float32' means exact fp32 on the GPU too: TF32 off for the call, restored after."""
        if self.device.type != "cuda" or self.dtype_name != "float32":
            yield
            return
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw posterior mean and std z (float32, on the input's device) of images in [-1, 1]."""
        with self._precision():
            dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return dist.mean.float().to(images.device), dist.std.float().to(images.device)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent z -> the latent the generative model sees, (z - shift) * scale."""
        return (z - self.shift_factor) * self.scale_factor

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of normalize: x / scale + shift."""
        return x / self.scale_factor + self.shift_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Normalised latents of the posterior mean (or of a posterior sample)."""
        mean, std = self.encode_moments(images)
        if sample:
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> float32 images in [-1, 1] on the latents' device."""
        with self._precision():
            out = self.model.decode(self.denormalize(latents.float()).to(self.device, self.dtype)).sample
        return out.float().clamp_(-1.0, 1.0).to(latents.device)


def build_tiny_autoencoder(levels: int = 2, seed: int = 0, latent_channels: int = 4, **config):
    """A randomly initialised, very small AutoencoderKL (downsampling 2**(levels-1)) for tests and CPU benchmarks."""
    from diffusers import AutoencoderKL

    widths = tuple(8 * 2 ** min(i, 1) for i in range(levels))  # (8, 16, 16, ...)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4,
            block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=32, **config,
        )

