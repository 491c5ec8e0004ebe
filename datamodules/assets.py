"""`make assets`: fetch the SD VAEs and torch-fidelity's Inception weights into one folder (needs internet).

Run it on a machine with internet, copy the folder to the cluster, and point the configs at it (printed
at the end), since compute nodes often cannot download.
  python -m datamodules.assets [--out data/assets] [--vae ema mse] [--skip-inception] [--dinov2]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


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


def download_vae(repo_id: str, out: Path) -> Path:
    """config.json + safetensors weights of one VAE into out/<name> (kept when already complete)."""
    from huggingface_hub import snapshot_download

    target = out / repo_id.split("/")[-1]
    if all((target / name).is_file() for name in VAE_FILES):
        print(f"  {repo_id}: already in {target}")
        return target
    snapshot_download(repo_id=repo_id, local_dir=target, allow_patterns=VAE_FILES)
    missing = [name for name in VAE_FILES if not (target / name).is_file()]
    if missing:
        raise RuntimeError(f"{repo_id}: download finished without {missing} in {target}")
    print(f"  {repo_id}: {target}")
    return target


def download_inception(out: Path) -> Path:
    """torch-fidelity's Inception weights into out/ (torch.hub writes to a temporary file, then renames)."""
    import torch

    url = inception_url()
    target = out / url.rsplit("/", 1)[-1]
    if target.is_file():
        print(f"  inception-v3-compat: already in {target}")
        return target
    torch.hub.download_url_to_file(url, str(target), progress=True)
    print(f"  inception-v3-compat: {target}")
    return target


# ---- DINOv2 ViT-L/14 for FD-DINOv2 (evaluation/dinov2.py); opt-in with --dinov2 (1.2 GB) --------------------
def dinov2_url() -> str:
    from evaluation.dinov2 import DINOV2_URL

    return DINOV2_URL


def download_dinov2(out: Path) -> Path:
    """The official dinov2_vitl14_pretrain.pth into out/ (torch.hub writes to a temporary file, then renames)."""
    import torch

    target = out / dinov2_url().rsplit("/", 1)[-1]
    if target.is_file():
        print(f"  dinov2_vitl14: already in {target}")
        return target
    torch.hub.download_url_to_file(dinov2_url(), str(target), progress=True)
    print(f"  dinov2_vitl14: {target}")
    return target
# ---- end of the DINOv2 block ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/assets", help="folder to download into (default: data/assets)")
    parser.add_argument("--vae", nargs="*", default=["ema", "mse"], choices=sorted(VAES), help="which SD VAEs")
    parser.add_argument("--skip-inception", action="store_true", help="do not fetch the FID Inception weights")
    parser.add_argument("--dinov2", action="store_true", help="also fetch DINOv2 ViT-L/14 (FD-DINOv2, 1.2 GB)")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    needed = ([hub] if args.vae else []) + ([] if args.skip_inception else [inception_url()])
    needed += [dinov2_url()] if args.dinov2 else []
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    unreachable = [url for url in needed if offline or not _reachable(url)]
    if unreachable:
        hosts = ", ".join(sorted({urlparse(u).hostname for u in unreachable}))
        print(
            f"make assets needs internet, but {hosts} cannot be reached from here"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}. Nothing was downloaded.\n"
            f"Run `make assets` (python -m datamodules.assets --out DIR) on a machine with internet, copy DIR to "
            f"this machine, then set data.vae_local_path=DIR/sd-vae-ft-ema and "
            f"callbacks.fid.extractor.weights_path=DIR/{inception_url().rsplit('/', 1)[-1]}.",
            file=sys.stderr,
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    print(f"downloading into {out}")
    vae_dirs = {VAES[key]: download_vae(VAES[key], out) for key in args.vae}
    inception = None if args.skip_inception else download_inception(out)
    dinov2 = download_dinov2(out) if args.dinov2 else None
    print("\nPoint the configs at these files (Hydra overrides):")
    for repo_id, folder in vae_dirs.items():
        print(f"  data.vae={repo_id} data.vae_local_path={folder}")
    if inception is not None:
        print(f"  callbacks.fid.extractor.weights_path={inception}   (training FID callback)")
        print(f"  extractor.weights_path={inception}   (evaluate.py)")
    if dinov2 is not None:
        print(f"  extractor.dinov2=true extractor.dinov2_weights_path={dinov2}   (evaluate.py FD-DINOv2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
