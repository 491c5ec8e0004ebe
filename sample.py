"""Class-conditional samples from a project checkpoint or published weights: a PNG grid and an ADM-format .npz.

  python sample.py ckpt=outputs/.../last.ckpt                        # a run of this project: its stored config
  python sample.py experiment=published_dit_xl                       # DiT-XL/2 as published (weights: make assets)
  python sample.py ckpt=SiT-XL-2-256x256.pt experiment=published_sit_xl num_samples=50000 batch_size=125
  torchrun --nproc_per_node=8 sample.py experiment=published_dit_xl num_samples=50000   # ranks split the batches

Anything that is not a project checkpoint (official DiT/SiT/REPA .pt, .safetensors, a diffusers folder) is loaded
into the network that model=/objective=/data= (or a published_* preset) describe. Batches are written as they finish
(tmp + rename), so an interrupted run continues; arr_0 is uint8 [N, H, W, 3] as ADM's evaluator reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm


@dataclass
class Source:
    """What sample.py draws from: the network (its sampling weights), the objective and the data config."""

    net: torch.nn.Module
    objective: torch.nn.Module
    data_cfg: dict
    path: Path
    description: str


def load_source(cfg: DictConfig) -> Source:
    """cfg.ckpt as a project checkpoint (its stored config), else weights (cfg.ckpt or model.init_from) loaded
    into the network of cfg.model, with cfg.objective and cfg.data."""
    from backbones.checkpoint import ENTRIES, build_network, is_project_checkpoint
    from workflow.config_guard import instantiate_trusted

    if cfg.entry not in ENTRIES:
        raise ValueError(f"entry={cfg.entry!r}; choose one of {ENTRIES}")
    if cfg.ckpt and is_project_checkpoint(cfg.ckpt):
        from gen_objectives.module import GenerativeModule

        if cfg.entry == "model":
            raise ValueError("entry=model: a project checkpoint has 'ema' and 'state_dict' (its raw weights)")
        module = GenerativeModule.from_checkpoint(str(cfg.ckpt), map_location="cpu")
        raw = cfg.entry == "state_dict"
        data_cfg = {**module.hparams["cfg"]["data"], **OmegaConf.to_container(cfg.data_overrides, resolve=True)}
        return Source(module.net if raw else module.ema.net, module.objective, data_cfg, Path(cfg.ckpt),
                      f"{cfg.ckpt} (project checkpoint, {'raw' if raw else 'EMA'} weights)")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.ckpt:
        model_cfg.update(init_from=str(cfg.ckpt), init_entry=cfg.entry)
    if not model_cfg.get("init_from"):
        raise ValueError("nothing to sample from: set ckpt=<checkpoint, .pt, .safetensors or diffusers folder> "
                         "or model.init_from=<file>")
    path = Path(model_cfg["init_from"])
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; published weights: `make assets ARGS='--published "
                                "dit_xl sit_xl'` on a machine with internet, then copy data/assets here")
    net = build_network(model_cfg, from_file=False)
    objective = instantiate_trusted(cfg.objective, "objective")
    convention = model_cfg.get("time_convention", "project")
    return Source(net, objective, OmegaConf.to_container(cfg.data, resolve=True), path,
                  f"{path} (weights, time_convention={convention})")


def sample_seed(seed: int, index: int, stream: int) -> int:
    """An independent 63-bit seed per (seed, sample or batch index, stream)."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> 1)


def noise_and_labels(start: int, end: int, shape: tuple[int, ...], num_classes: int, classes: list[int] | None,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise [B, *shape] and labels [B] of samples start..end-1, each from its own seed (any batch size).

    Labels: uniform over num_classes (ADM/DiT FID sets), or sample i gets classes[i % len(classes)] (a grid whose
    columns are classes when grid_nrow = len(classes)).
    """
    noise, labels = [], []
    for i in range(start, end):
        g = torch.Generator().manual_seed(sample_seed(seed, i, 0))
        drawn = int(torch.randint(num_classes, (1,), generator=g))
        labels.append(drawn if classes is None else classes[i % len(classes)])
        noise.append(torch.randn(1, *shape, generator=g))
    return torch.cat(noise), torch.tensor(labels, dtype=torch.long)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, 3] as DiT's sample_ddp.py (127.5 x + 128, clamp, truncate)."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return (x.repeat(1, 1, 1, 3) if x.shape[-1] == 1 else x).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, nrow: int) -> None:
    """A PNG grid of uint8 [N, H, W, 3] with 1-pixel grey lines, upscaled so tiny samples stay visible."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    scale = max(1, -(-64 // h))
    pil = Image.fromarray(grid)
    tmp = path.with_name(path.name + ".tmp.png")
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(tmp)
    os.replace(tmp, path)


def default_out_dir(path: Path, settings: dict) -> Path:
    """<source dir>/samples/<source name>/<sampler>-<steps>steps-cfg<scale>-seed<seed>-bs<batch size>."""
    path = path.resolve()
    tag = (f"{settings['sampler']}-{settings['num_steps']}steps-cfg{settings['cfg_scale']:g}"
           f"-seed{settings['seed']}-bs{settings['batch_size']}")
    return path.parent / "samples" / path.name.removesuffix(path.suffix) / tag


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def run(cfg: DictConfig) -> dict:
    """Everything sample.py does; returns what it wrote."""
    from workflow.config_guard import instantiate_trusted

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = world()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(cfg.device if cfg.device != "auto" else (f"cuda:{local}" if torch.cuda.is_available()
                                                                   else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)

    src = load_source(cfg)
    net, objective = src.net.to(device).eval(), src.objective
    datamodule = instantiate_trusted(src.data_cfg, "data")
    num_classes = int(src.data_cfg["num_classes"])
    shape = (int(src.data_cfg["channels"]), int(src.data_cfg["image_size"]), int(src.data_cfg["image_size"]))
    classes = None if cfg.classes is None else [int(c) for c in cfg.classes]
    if classes is not None and not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes={classes}: every class must be in 0..{num_classes - 1} (data.num_classes)")
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ValueError(f"num_samples={cfg.num_samples} and batch_size={cfg.batch_size} must be >= 1")
    settings = {"source": src.description, "sampler": cfg.sampler or objective.default_sampler,
                "num_steps": int(cfg.num_steps or objective.default_num_steps), "cfg_scale": float(cfg.cfg_scale),
                "seed": int(cfg.seed), "batch_size": int(cfg.batch_size), "classes": classes}
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(src.path, settings)
    (out / "batches").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(f"[sample] {src.description}: {settings['sampler']}, {settings['num_steps']} steps, cfg {settings['cfg_scale']:g}"
              f" -> {out}", flush=True)
        stored = out / "settings.json"
        if stored.is_file() and json.loads(stored.read_text()) != settings:
            raise ValueError(f"{out} holds samples made with other settings ({stored}); set out_dir= or delete it")
        stored.write_text(json.dumps(settings, indent=2))

    bounds = [(s, min(s + cfg.batch_size, cfg.num_samples)) for s in range(0, cfg.num_samples, cfg.batch_size)]
    mine = [(b, s, e) for b, (s, e) in enumerate(bounds) if b % world_size == rank
            and not (out / "batches" / f"{b:06d}.npz").is_file()]
    bar = tqdm(total=sum(e - s for _, s, e in mine), unit="sample", disable=not cfg.progress or rank != 0)
    for b, s, e in mine:
        noise, labels = noise_and_labels(s, e, shape, num_classes, classes, cfg.seed)
        gen = torch.Generator(device=device).manual_seed(sample_seed(cfg.seed, s, 1))
        with torch.no_grad():
            x = objective.sample(net, noise.to(device), labels.to(device), sampler=settings["sampler"],
                                 num_steps=settings["num_steps"], cfg_scale=settings["cfg_scale"], generator=gen)
            images = to_uint8(datamodule.decode(x))
        path = out / "batches" / f"{b:06d}.npz"
        with open(path.with_name(path.name + f".tmp{os.getpid()}"), "wb") as f:
            np.savez(f, images=images, labels=labels.numpy())
        os.replace(f.name, path)
        bar.update(e - s)
    bar.close()
    if world_size > 1:
        dist.barrier()
    result = {"out_dir": str(out)}
    if rank == 0:
        result.update(write_outputs(out, len(bounds), cfg))
        print(f"[sample] wrote {result['grid']}" + (f" and {result['npz']}" if "npz" in result else ""), flush=True)
    if world_size > 1:
        dist.barrier()
    return result


def write_outputs(out: Path, num_batches: int, cfg: DictConfig) -> dict:
    """The grid of the first grid_samples and the ADM .npz (arr_0 images, arr_1 labels), each written atomically."""
    first = np.load(out / "batches" / f"{0:06d}.npz")["images"]
    n, (h, w) = cfg.num_samples, first.shape[1:3]
    images = np.lib.format.open_memmap(out / "arr_0.tmp.npy", mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
    labels = np.empty(n, np.int64)
    start = 0
    for b in range(num_batches):
        with np.load(out / "batches" / f"{b:06d}.npz") as f:
            images[start:start + len(f["labels"])], labels[start:start + len(f["labels"])] = f["images"], f["labels"]
            start += len(f["labels"])
    written = {"grid": str(out / "samples_grid.png")}
    save_grid(np.asarray(images[:min(cfg.grid_samples, n)]), out / "samples_grid.png", cfg.grid_nrow)
    if cfg.save_npz:
        npz = out / f"samples_{n}x{h}x{w}x3.npz"
        with open(npz.with_name(npz.name + ".tmp"), "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels)
        os.replace(f.name, npz)
        written["npz"] = str(npz)
    del images
    (out / "arr_0.tmp.npy").unlink()
    return written


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
