"""FD-DINOv2's extractor: the ViT-L/14 parameter layout of the official hub model, strict loading from a
local file, dgm-eval's preprocessing, and a tiny random ViT against a forward pass written out here."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.dinov2 import DINOV2_FILE, VITL14, DinoV2Features, DinoViT
from evaluation.metrics import MetricAccumulator
from evaluation.reference import Reference

TINY = {"name": "tiny", "dim": 32, "depth": 2, "heads": 4, "patch": 14, "pretrain_size": 56, "mlp_ratio": 4}


def official_vitl14_layout() -> dict:
    """Parameter names and shapes of torch.hub's dinov2_vitl14 (block_chunks=0, MLP FFN, LayerScale, no
    registers, pos_embed for 518 px = 37 x 37 patches + CLS): 343 tensors, 304,368,640 numbers."""
    d, h = 1024, 4096
    out = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + 37 * 37, d), "mask_token": (1, d),
           "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
           "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(24):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                    b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                    b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                    b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h),
                    b + "mlp.fc2.bias": (d,), b + "ls2.gamma": (d,)})
    return out


def test_vitl14_parameters_are_the_official_layout():
    with torch.device("meta"):
        net = DinoViT(**VITL14)
    layout = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert layout == official_vitl14_layout()
    assert len(layout) == 343 and sum(np.prod(s) for s in layout.values()) == 304_368_640


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(0)
    net = DinoViT(**TINY)
    state = {k: torch.randn_like(v) * 0.3 for k, v in net.state_dict().items()}
    path = tmp_path / DINOV2_FILE
    torch.save(state, path)
    return path, state


def written_out_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The DINOv2 inference path with explicit attention, from the state dict alone."""
    dim, heads, p = TINY["dim"], TINY["heads"], TINY["patch"]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1)
    g, m = x.shape[-1] // p, 4
    grid = sd["pos_embed"][:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((g + 0.1) / m, (g + 0.1) / m), mode="bicubic", antialias=False)
    t = t + torch.cat([sd["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, dim)], dim=1)
    ln = lambda v, k: F.layer_norm(v, (dim,), sd[k + ".weight"], sd[k + ".bias"], eps=1e-6)
    for i in range(TINY["depth"]):
        b = f"blocks.{i}."
        qkv = F.linear(ln(t, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(len(x), -1, 3, heads, dim // heads).unbind(2)  # [B, N, h, c]
        att = torch.softmax(torch.einsum("bnhc,bmhc->bhnm", q, k) / (dim // heads) ** 0.5, dim=-1)
        o = torch.einsum("bhnm,bmhc->bnhc", att, v).reshape(len(x), -1, dim)
        t = t + sd[b + "ls1.gamma"] * F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        hdn = F.gelu(F.linear(ln(t, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        t = t + sd[b + "ls2.gamma"] * F.linear(hdn, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(t, "norm")[:, 0]


def test_tiny_random_vit_loads_strictly_and_matches_the_written_out_pass(tiny_weights, tmp_path):
    path, state = tiny_weights
    ext = DinoV2Features(weights_path=str(path), arch=TINY)
    assert ext.name == "dinov2-tiny" and ext.dims == {"pool": 32}
    images = torch.randint(0, 256, (3, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    feats = ext(images)["pool"]
    # dgm-eval: PIL bicubic resize to 224, ToTensor (/255), ImageNet mean/std
    pil = np.stack([np.asarray(Image.fromarray(a).resize((224, 224), Image.BICUBIC))
                    for a in images.permute(0, 2, 3, 1).numpy()])
    x = torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, written_out_forward(state, x), rtol=1e-4, atol=1e-4)
    gray = images[:, :1]
    torch.testing.assert_close(ext(gray)["pool"], ext(gray.expand(-1, 3, -1, -1).contiguous())["pool"])
    # FD-DINOv2 through the accumulator, named as dgm-eval's FD_dinov2
    acc = MetricAccumulator(ext, 3, precision_recall=False, kid=False)
    acc.update(images, torch.zeros(3), torch.arange(3))
    m = acc.finalize(Reference({"pool": (np.zeros(32), np.eye(32))}, None, 3, {"extractor": ext.name}))
    assert "fd_dinov2_3" in m and m["fd_dinov2_3"] > 0


def test_wrong_or_missing_weights_fail_with_one_clear_line(tiny_weights, tmp_path):
    path, state = tiny_weights
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in state.items() if k != "mask_token"}, bad)
    with pytest.raises(ValueError, match="not a DINOv2 tiny state dict") as err:
        DinoV2Features(weights_path=str(bad), arch=TINY)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="make assets") as err:
        DinoV2Features(weights_path=str(tmp_path / "nowhere.pth"))
    assert "dinov2_weights_path" in str(err.value) and "dl.fbaipublicfiles.com" in str(err.value)
    # found through the cache directory (the default ViT-L/14 shape: a tiny file there is refused, not used)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / DINOV2_FILE).symlink_to(path)
    assert DinoV2Features(cache_dir=str(tmp_path / "cache"), arch=TINY).weights_file.endswith(DINOV2_FILE)
    with pytest.raises(ValueError, match="vitl14"):
        DinoV2Features(cache_dir=str(tmp_path / "cache"))
