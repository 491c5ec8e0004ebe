"""diffusers' DiTTransformer2DModel layout <-> the official DiT layout (ours), and export for diffusers' DiTPipeline.

Only names and the q/k/v split differ; the numerics do too, and the project's DiT keeps the OFFICIAL ones:
diffusers embeds time with downscale_freq_shift=1 (frequencies exp(-ln(1e4) k / (half - 1)) instead of / half) and
normalises before the MLP with eps 1e-5, so converted weights give the official model's outputs here, not
diffusers'. diffusers keeps one copy of the time/class embedders per block; they must be identical to convert.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from backbones.dit import DiT, sincos_pos_embed_2d

BLOCKS = "transformer_blocks"
EMB = "norm1.emb"  # where each diffusers block keeps its copy of the shared embedders

# official name -> diffusers name, each with .weight and .bias (the DiT side is ours, the official layout)
GLOBAL_LINEARS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
# official name -> diffusers name under transformer_blocks.<i>.norm1.emb (weight and bias unless noted)
SHARED_EMBEDDERS = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}
# official name -> diffusers name inside block i
BLOCK_LINEARS = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")  # concatenated in this order into attn.qkv


def is_diffusers_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(f"{BLOCKS}.") for k in state) or "proj_out_2.weight" in state


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"{BLOCKS}.")}
    if blocks != set(range(len(blocks))):
        raise ValueError(f"diffusers state dict has transformer blocks {sorted(blocks)}: not 0..N-1")
    return len(blocks)


def diffusers_to_dit(state: Mapping[str, torch.Tensor], grid_size: int) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel weights -> official DiT keys; pos_embed recomputed for a grid_size x grid_size grid.

    Raises ValueError if the blocks' copies of the shared embedders differ or a key is left over.
    """
    src = dict(state)
    depth = _depth(src)
    if depth == 0:
        raise ValueError("diffusers state dict has no transformer_blocks")
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in GLOBAL_LINEARS.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = src.pop(f"{theirs}.{p}")
    for ours, theirs in SHARED_EMBEDDERS.items():
        copies = [src.pop(f"{BLOCKS}.{i}.{EMB}.{theirs}") for i in range(depth)]
        differing = [i for i, c in enumerate(copies) if not torch.equal(c, copies[0])]
        if differing:
            raise ValueError(f"diffusers blocks {differing} hold a different {theirs} than block 0: the shared "
                             f"embedder has no single value, refusing to convert ({ours})")
        out[ours] = copies[0]
    for i in range(depth):
        pre = f"{BLOCKS}.{i}"
        for ours, theirs in BLOCK_LINEARS.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = src.pop(f"{pre}.{theirs}.{p}")
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([src.pop(f"{pre}.{name}.{p}") for name in QKV], dim=0)
    src.pop("pos_embed.pos_embed", None)  # older diffusers saved the fixed table; it is recomputed
    if src:
        raise ValueError(f"diffusers keys with no DiT counterpart: {sorted(src)[:10]}")
    hidden = out["x_embedder.proj.weight"].shape[0]
    out["pos_embed"] = sincos_pos_embed_2d(hidden, grid_size)[None]  # [1, N, D]
    return out


def dit_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DiT keys -> DiTTransformer2DModel keys (embedders copied into every block; pos_embed dropped)."""
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in GLOBAL_LINEARS.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for i in range(depth):
        pre = f"{BLOCKS}.{i}"
        for ours, theirs in SHARED_EMBEDDERS.items():
            out[f"{pre}.{EMB}.{theirs}"] = state[ours].clone()
        for ours, theirs in BLOCK_LINEARS.items():
            for p in ("weight", "bias"):
                out[f"{pre}.{theirs}.{p}"] = state[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(QKV, state[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{pre}.{name}.{p}"] = part.contiguous()
    return out


def diffusers_config(net: DiT) -> dict:
    """DiTTransformer2DModel constructor arguments for `net` (eps 1e-6 as the official DiT, not diffusers' 1e-5)."""
    mlp_hidden = net.blocks[0].mlp.fc1.out_features
    if mlp_hidden != 4 * net.hidden_size:
        raise ValueError(f"diffusers' DiT has an MLP ratio of 4; this net has {mlp_hidden / net.hidden_size:g} "
                         "(model.mlp_ratio)")
    if net.y_embedder.embedding_table.num_embeddings != net.num_classes + 1:
        raise ValueError("diffusers' DiT always has a null class row: build the net with model.class_dropout_prob > 0")
    return dict(num_attention_heads=net.num_heads, attention_head_dim=net.hidden_size // net.num_heads,
                in_channels=net.in_channels, out_channels=net.out_channels, num_layers=len(net.blocks),
                sample_size=net.input_size, patch_size=net.patch_size, num_embeds_ada_norm=net.num_classes,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
                norm_eps=1e-6)


def to_diffusers_model(net: DiT):
    """A diffusers DiTTransformer2DModel holding `net`'s weights (loaded strictly, so no key is left out)."""
    from diffusers import DiTTransformer2DModel

    if not isinstance(net, DiT):
        raise TypeError(f"export needs the project's DiT (unwrapped), got {type(net).__name__}; diffusers' "
                        "DiTPipeline samples DDPM with integer timesteps, so only time_convention=project nets fit")
    model = DiTTransformer2DModel(**diffusers_config(net))
    state = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
    model.load_state_dict(dit_to_diffusers(state), strict=True)
    return model.eval()


def export_diffusers(net: DiT, folder: str | os.PathLike, *, vae=None, beta_start: float = 1e-4,
                     beta_end: float = 0.02, num_train_timesteps: int = 1000) -> Path:
    """Writes `folder` for diffusers: transformer/ alone, or a whole DiTPipeline when a VAE is given.

    The pipeline's scheduler is DDPM with DiT's linear betas and the posterior variance beta-tilde: DiTPipeline drops
    the learned-variance channels before the scheduler step (swap in another scheduler with .from_config). Written to a temporary folder and renamed, so `folder` is complete or absent.
    """
    from diffusers import DDPMScheduler, DiTPipeline

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; choose another folder or delete it")
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer = to_diffusers_model(net)
    try:
        if vae is None:
            transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        else:
            scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                      beta_end=beta_end, beta_schedule="linear", clip_sample=False,
                                      variance_type="fixed_small")
            DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(
                tmp, safe_serialization=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
