"""`make assets`: fetch the VAE presets' weights and torch-fidelity's Inception weights into one folder (needs internet).

Run it on a machine with internet, copy the folder to the cluster, and point the configs at it (printed
at the end), since compute nodes often cannot download.
  python -m datamodules.assets [--out data/assets] [--vae sd-vae-ft-ema sd-vae-ft-mse sdxl sd3 flux] [--skip-inception]
                                [--published dit_xl sit_xl] [--dinov2]
The VAE table is conf/data/vae/*.yaml (hub id + subfolder per preset); sd3 and flux are gated on the hub:
accept their licences there and `huggingface-cli login` first.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from datamodules.vae_presets import vae_preset, vae_presets

# ---- VAEs: one row per preset of conf/data/vae (its hub id and subfolder), the files a VAE folder needs
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
DEFAULT_VAES = ["sd-vae-ft-ema", "sd-vae-ft-mse"]


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A TCP probe of the host, so an offline machine fails in seconds with a clear message."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def inception_url() -> str:
    """The URL torch-fidelity itself downloads inception-v3-compat from (read from the installed package)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def download_vae(name: str, out: Path) -> Path:
    """config.json + safetensors weights of one VAE preset into out/<name>[/<subfolder>] (kept when complete)."""
    from huggingface_hub import snapshot_download

    preset = vae_preset(name)
    target = out / name
    files = [f"{preset['subfolder']}/{f}" if preset["subfolder"] else f for f in VAE_FILES]
    if all((target / f).is_file() for f in files):
        print(f"  {name} ({preset['hub_id']}): already in {target}")
        return target
    snapshot_download(repo_id=preset["hub_id"], local_dir=target, allow_patterns=files,
                      revision=preset["revision"])
    missing = [f for f in files if not (target / f).is_file()]
    if missing:
        raise RuntimeError(f"{preset['hub_id']}: download finished without {missing} in {target}")
    print(f"  {name} ({preset['hub_id']}): {target}")
    return target


def download_file(url: str, target: Path, label: str) -> Path:
    """One weight file into target (torch.hub writes to a temporary file, then renames: never half-written)."""
    import torch

    if target.is_file():
        print(f"  {label}: already in {target}")
        return target
    torch.hub.download_url_to_file(url, str(target), progress=True)
    print(f"  {label}: {target}")
    return target


def download_inception(out: Path) -> Path:
    """torch-fidelity's Inception weights into out/."""
    url = inception_url()
    return download_file(url, out / url.rsplit("/", 1)[-1], "inception-v3-compat")


# ---- published DiT-XL/2 and SiT-XL/2 weights (issue #14): the URLs of the official READMEs / download.py ----------
PUBLISHED = {  # name -> (file name the published_* presets read from the assets folder, URL)
    "dit_xl": ("DiT-XL-2-256x256.pt", "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "sit_xl": ("SiT-XL-2-256x256.pt", "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/"
                                      "SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"),
}
PUBLISHED_PRESETS = {"dit_xl": "published_dit_xl", "sit_xl": "published_sit_xl"}


def download_published(name: str, out: Path) -> Path:
    """One published weight file into out/ under the name the published_* presets read."""
    filename, url = PUBLISHED[name]
    return download_file(url, out / filename, filename)


# ---- DINOv2 ViT-L/14 for FD-DINOv2 (evaluation/dinov2.py); opt-in with --dinov2 (1.2 GB) --------------------
def dinov2_url() -> str:
    from evaluation.dinov2 import DINOV2_URL

    return DINOV2_URL


def download_dinov2(out: Path) -> Path:
    """The official dinov2_vitl14_pretrain.pth into out/."""
    return download_file(dinov2_url(), out / dinov2_url().rsplit("/", 1)[-1], "dinov2_vitl14")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/assets", help="folder to download into (default: data/assets)")
    parser.add_argument("--vae", nargs="*", default=DEFAULT_VAES, choices=vae_presets(),
                        help="which VAE presets (conf/data/vae)")
    parser.add_argument("--skip-inception", action="store_true", help="do not fetch the FID Inception weights")
    parser.add_argument("--published", nargs="*", default=[], choices=sorted(PUBLISHED),
                        help="published weights (about 2.7 GB each) for experiment=published_<name>")
    parser.add_argument("--dinov2", action="store_true", help="also fetch DINOv2 ViT-L/14 (FD-DINOv2, 1.2 GB)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    needed = ([hub] if args.vae else []) + ([] if args.skip_inception else [inception_url()])
    needed += [PUBLISHED[name][1] for name in args.published]
    needed += [dinov2_url()] if args.dinov2 else []
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    unreachable = [url for url in needed if offline or not _reachable(url)]
    if unreachable:
        hosts = ", ".join(sorted({urlparse(u).hostname for u in unreachable}))
        print(
            f"make assets needs internet, but {hosts} cannot be reached from here"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Nothing was downloaded.\n"
            f"Run `make assets` (python -m datamodules.assets --out DIR) on a machine with internet, copy DIR to "
            f"this machine, then set data.vae_local_path=DIR/sd-vae-ft-ema (DIR/<preset> with data/vae=<preset>) and "
            f"callbacks.fid.extractor.weights_path=DIR/{inception_url().rsplit('/', 1)[-1]}.",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    print(f"downloading into {out}")
    vae_dirs = {name: download_vae(name, out) for name in args.vae}
    inception = None if args.skip_inception else download_inception(out)
    published = {name: download_published(name, out) for name in args.published}
    dinov2 = download_dinov2(out) if args.dinov2 else None
    print("\nPoint the configs at these files (Hydra overrides):")
    for name, folder in vae_dirs.items():
        print(f"  data/vae={name} data.vae_local_path={folder}")
    if inception is not None:
        print(f"  callbacks.fid.extractor.weights_path={inception}   (training FID callback)")
        print(f"  extractor.weights_path={inception}   (evaluate.py)")
    for name, path in published.items():
        print(f"  experiment={PUBLISHED_PRESETS[name]} model.init_from={path}   (sample.py, train.py)")
    if dinov2 is not None:
        print(f"  extractor.dinov2=true extractor.dinov2_weights_path={dinov2}   (evaluate.py FD-DINOv2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
