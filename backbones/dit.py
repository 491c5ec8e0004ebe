"""DiT (Peebles & Xie, 2023) written for this project, with the official state_dict layout.

The module names and parameter shapes follow the official DiT release so that its checkpoints (and SiT's)
load with strict=True; the code itself is ours. Shapes in comments: B batch, N tokens, D hidden size,
H heads, P patch size, C channels.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# depth, hidden size and heads of the four published sizes; the patch size is a separate key
DIT_PRESETS: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def dit_preset(name: str, **overrides) -> dict:
    """Constructor kwargs for a name like 'B/2' or 'XL/4' (official DiT defaults for the rest)."""
    size, _, patch = name.upper().partition("/")
    if size not in DIT_PRESETS:
        raise ValueError(f"unknown DiT size {size!r} in {name!r}; expected one of {sorted(DIT_PRESETS)}")
    kwargs = dict(input_size=32, patch_size=int(patch or 2), in_channels=4, mlp_ratio=4.0,
                  class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, **DIT_PRESETS[size])
    kwargs.update(overrides)
    return kwargs


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [grid_size**2, dim]: first half encodes the column, second the row."""
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # [g, g] each; token n = row * g + col

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [g*g] -> [g*g, D/2]
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()  # [g*g, D]


def name_seed(seed: int, name: str) -> int:
    """A stable 63-bit generator seed from (seed, parameter name); Python's hash() is salted per process."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, broadcast over tokens; x [B,N,D], shift/scale [B,D]."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class PatchEmbed(nn.Module):
    """Non-overlapping PxP patches to tokens by a strided conv (official key: x_embedder.proj)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, D, H/P, W/P]
        # contiguous once here; otherwise the residual stream inherits the transposed strides and every
        # LayerNorm (forward and backward) makes its own contiguous copy
        return x.flatten(2).transpose(1, 2).contiguous()  # [B, N, D], row-major over patches


class TimestepEmbedder(nn.Module):
    """Scalar time -> sinusoidal features (256, cos then sin) -> 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def timestep_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """[B] float time -> [B, frequency_embedding_size] fp32 features (t may be fractional)."""
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # [half]
        args = t.float()[:, None] * freqs[None]  # [B, half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t))  # [B, D]


class LabelEmbedder(nn.Module):
    """Class label -> vector; an extra row (index num_classes) is the null class for CFG label dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null class: at random with dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if self.dropout_prob <= 0:
            if force_drop_ids is not None:
                raise ValueError("force_drop_ids needs a null class: build the DiT with class_dropout_prob > 0")
            if bool((labels >= self.num_classes).any()):  # only models without a null row pay this check
                raise ValueError(
                    f"this DiT has no null class (built with class_dropout_prob=0, so label {self.num_classes} "
                    "does not exist): classifier-free guidance (cfg_scale != 1) needs a model trained with "
                    "class_dropout_prob > 0; sample with cfg_scale=1")
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # [B, D]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA (flash/efficient kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, H, D/H]
        # unbind before transposing: backward then stacks the q/k/v grads straight into qkv's layout
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # each [B, H, N, D/H], strided views
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D/H]
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # free on flash kernels: output is [B,N,H,D/H] in memory


class Mlp(nn.Module):
    """Transformer MLP with tanh-approximated GELU, as in the official DiT."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block conditioned by adaLN-Zero: shift/scale before, gate after, attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x [B, N, D], c [B, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to PxPxC_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, P*P*C_out]


class DiT(nn.Module):
    """Class-conditional diffusion transformer: net(x [B,C,H,W], t [B], y [B]) -> [B, C_out, H, W]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
        init_seed: int | None = None,
    ):
        super().__init__()
        if patch_size < 1 or input_size % patch_size != 0:
            raise ValueError(f"input_size={input_size} must be divisible by patch_size={patch_size}")
        if num_heads < 1 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} must be in [0, 1)")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing
        self.grid_size = input_size // patch_size

        device = torch.get_default_device()  # where the caller wants the weights (meta stays meta)
        with torch.device("meta"):  # build without drawing from any RNG: the init below is the only one
            self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
            self.t_embedder = TimestepEmbedder(hidden_size)
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
            # a frozen Parameter (not a buffer) as in the official model, so keys and parameter counts match
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
            self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
            self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if device.type != "meta":
            self.to_empty(device=device)
            self.initialize_weights(init_seed)

    @torch.no_grad()
    def initialize_weights(self, seed: int | None = None) -> None:
        """Official init (xavier linears, N(0, 0.02) embeddings, sin-cos positions, adaLN-Zero), per parameter.

        Each tensor is drawn from its own generator seeded by (seed, parameter name), so a tensor's initial values
        never depend on which other modules exist (learn_sigma, output channels, depth): objectives that share a
        seed share their starting weights. seed=None takes exactly one draw from the global CPU RNG, so building
        any DiT leaves the global stream (data order, label dropout) in the same state.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        zero = {"final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"}
        zero |= {f"blocks.{i}.adaLN_modulation.1.weight" for i in range(len(self.blocks))}
        normal = {"y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight"}
        for name, p in self.named_parameters():
            value = torch.empty(p.shape, dtype=torch.float32)  # drawn on CPU: the same weights on every device
            g = torch.Generator().manual_seed(name_seed(seed, name))
            if name == "pos_embed":
                value = sincos_pos_embed_2d(self.hidden_size, self.grid_size)[None]
            elif name.endswith("bias") or name in zero:
                value.zero_()
            elif name in normal:
                nn.init.normal_(value, std=0.02, generator=g)
            else:  # linear weights and the patch conv, the latter as a linear over its flattened input
                nn.init.xavier_uniform_(value.view(value.shape[0], -1), generator=g)
            p.copy_(value)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, P*P*C_out] -> [B, C_out, H, W]; each token holds its patch as (row, col, channel)."""
        B, g, p, c = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, P, g, P]
        return x.reshape(B, c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, C, H, W], t [B] float, y [B] long (index num_classes = null class)
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # [B, D]
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if use_ckpt else block(x, c)
        x = self.final_layer(x, c)  # [B, N, P*P*C_out]
        return self.unpatchify(x)  # [B, C_out, H, W]
