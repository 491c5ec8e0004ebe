"""Tiny random networks written by the tests in every layout the loaders read: the official DiT file, SiT's and
REPA's training files, diffusers folders and the project's own Lightning checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from backbones.dit import DiT

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
MODEL_CFG = {"_target_": "backbones.dit.DiT", **TINY}
CONF = Path(__file__).resolve().parents[1] / "conf"


def random_dit(seed: int = 0, **overrides) -> DiT:
    """A DiT with every weight perturbed (adaLN-Zero would hide wiring mistakes), in eval mode."""
    net = DiT(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def inputs(net: DiT, batch: int = 3, seed: int = 1, t_max: float = 999.0):
    """x [B,C,H,W], t [B] in [0, t_max], y [B] including the null class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.input_size, net.input_size, generator=g)
    t = torch.rand(batch, generator=g) * t_max
    y = torch.randint(0, net.num_classes + 1, (batch,), generator=g)
    return x, t, y


@torch.no_grad()
def outputs(net: torch.nn.Module, x, t, y) -> torch.Tensor:
    return net.eval()(x, t, y)


def write_official(net: DiT, path: Path) -> Path:
    """DiT's release format: a plain state dict."""
    torch.save(net.state_dict(), path)
    return path


def write_sit_training(ema: DiT, path: Path, model: DiT | None = None) -> Path:
    """SiT's (and DiT's) train.py format: model, ema, opt and the argparse.Namespace of its arguments."""
    model = model or random_dit(seed=99, **{k: getattr(ema, k) for k in ("num_classes", "learn_sigma")})
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="SiT-XL/2", path_type="Linear", image_size=256)}, path)
    return path


def write_repa(net: DiT, path: Path, z_dim: int = 24, projector_dim: int = 40) -> Path:
    """REPA's train.py format: the DiT keys plus its projector MLPs (projectors.<i>.{0,2,4}) in model and ema."""
    g = torch.Generator().manual_seed(5)
    projector = {f"projectors.0.{i}.{p}": torch.randn(shape, generator=g) for i, (p, shape) in enumerate(
        [("weight", (projector_dim, net.hidden_size)), ("bias", (projector_dim,))])}
    projector.update({"projectors.0.4.weight": torch.randn(z_dim, projector_dim, generator=g),
                      "projectors.0.4.bias": torch.randn(z_dim, generator=g)})
    state = {**net.state_dict(), **projector}
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b", encoder_depth=8),
                "steps": 400000}, path)
    return path


def random_diffusers(seed: int = 0, **config):
    """A diffusers DiTTransformer2DModel with perturbed weights; every block's embedder copy equal to block 0's,
    as in facebook/DiT-XL-2-256 (converted from one official model)."""
    from diffusers import DiTTransformer2DModel

    config = {**dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                     sample_size=8, patch_size=2, num_embeds_ada_norm=5), **config}
    model = DiTTransformer2DModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model.eval()


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def write_lightning(path: Path, steps: int = 2) -> Path:
    """A real GenerativeModule checkpoint: a 1-block DiT on 8x8 digits-shaped data, `steps` optimizer steps."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, TensorDataset

    from gen_objectives.module import GenerativeModule

    cfg = compose("train", ["experiment=digits", "objective=flow", "model.hidden_size=32", "model.depth=1",
                            "model.num_heads=2"])
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "objective", "data")}
    torch.manual_seed(0)
    module = GenerativeModule(instantiate(cfg.model), instantiate(cfg.objective), optim={"lr": 1e-2},
                              sample_shape=(1, 8, 8), cfg=plain, t_bucket_every_n_steps=1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread avoids oversubscribing shared CPUs
    try:
        trainer.fit(module, DataLoader(data, batch_size=8))
        trainer.save_checkpoint(path)
    finally:
        torch.set_num_threads(threads)
    return path
