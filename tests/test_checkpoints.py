"""Loading published weights (issue #14 items 3-5): every layout loads strictly with the source's outputs; formats
by content; mismatches name the config key; diffusers conversion against the official DiT's numerics; export."""

import re
from pathlib import Path

import pytest
import torch
from checkpoint_files import (
    MODEL_CFG,
    TINY,
    inputs,
    outputs,
    random_diffusers,
    random_dit,
    write_lightning,
    write_official,
    write_repa,
    write_sit_training,
)
from oracles import single_thread  # noqa: F401 (fixture)

from backbones.checkpoint import load_network, load_weights
from backbones.dit import DiT

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors on shared CPUs
REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "dit_official_tiny.pt"


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    return write_lightning(tmp_path_factory.mktemp("run") / "last.ckpt")


# ---------------------------------------------------------------- item 5: the loader's defects


def test_torch_floor_provides_safe_globals():
    """checkpoint.py uses torch.serialization.safe_globals (torch >= 2.5); pyproject must not allow less."""
    floor = re.search(r'"torch>=(\d+)\.(\d+)[^"]*"', (REPO / "pyproject.toml").read_text())
    assert (int(floor[1]), int(floor[2])) >= (2, 5), f"pyproject allows {floor[0]}"
    assert hasattr(torch.serialization, "safe_globals")


def test_lightning_checkpoint_strips_net_prefix_and_picks_entry_by_key(lightning_ckpt):
    ckpt = torch.load(lightning_ckpt, weights_only=True)
    raw = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    assert any(not torch.equal(raw[k], v) for k, v in ckpt["ema"].items())  # two steps apart: entries differ
    cfg = {**MODEL_CFG, "input_size": 8, "in_channels": 1, "num_classes": 10, "depth": 1, "learn_sigma": False}
    for entry, expected in (("auto", ckpt["ema"]), ("ema", ckpt["ema"]), ("state_dict", raw)):
        net = DiT(**{k: v for k, v in cfg.items() if k != "_target_"})
        assert "entry" in load_weights(net, lightning_ckpt, entry=entry)
        for k, v in net.state_dict().items():
            assert torch.equal(v, expected[k]), (entry, k)
    with pytest.raises(ValueError, match="entry=model"):
        load_network(lightning_ckpt, cfg, entry="model")
    with pytest.raises(ValueError, match="init_entry='best'.*choose one of"):
        load_network(lightning_ckpt, cfg, entry="best")


def test_format_is_read_from_content_not_suffix(tmp_path):
    from safetensors.torch import save_file

    net = random_dit()
    x, t, y = inputs(net)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "weights.pt"))
    torch.save(net.state_dict(), tmp_path / "weights.safetensors")
    for name, fmt in (("weights.pt", "safetensors"), ("weights.safetensors", "torch file")):
        loaded = DiT(**TINY)
        assert fmt in load_weights(loaded, tmp_path / name)
        assert torch.equal(outputs(loaded, x, t, y), outputs(net, x, t, y))
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="neither a torch checkpoint nor a safetensors file"):
        load_weights(DiT(**TINY), tmp_path / "noise.pt")


@pytest.mark.parametrize("change, key", [
    ({"input_size": 16}, "data.image_size / model.patch_size = 4"),
    ({"learn_sigma": False}, "model.learn_sigma"),
    ({"num_classes": 7}, "data.num_classes=5 with a null class"),
    ({"in_channels": 3}, "data.channels=4"),
    ({"depth": 3}, "the file has 2 blocks, the model 3: model.depth"),
    ({"hidden_size": 64}, "model=dit_s|dit_b|dit_l|dit_xl"),
])
def test_size_mismatch_names_the_config_key(tmp_path, change, key):
    path = write_official(random_dit(), tmp_path / "DiT.pt")
    with pytest.raises(ValueError) as err:
        load_network(path, {**MODEL_CFG, **change})
    message = str(err.value)
    assert key in message and "\n" not in message and str(path) in message


# ---------------------------------------------------------------- items 1 and 4: official, SiT and REPA layouts


@pytest.mark.parametrize("layout", ["official", "sit_training", "repa"])
def test_published_layouts_load_strictly_with_the_source_outputs(tmp_path, layout):
    learn_sigma = layout != "repa"  # REPA's SiT predicts the velocity only (out_channels = in_channels)
    src = random_dit(seed=3, learn_sigma=learn_sigma)
    write = {"official": write_official, "sit_training": write_sit_training, "repa": write_repa}[layout]
    path = write(src, tmp_path / f"{layout}.pt")
    net = DiT(**TINY, learn_sigma=learn_sigma)
    message = load_weights(net, path)
    x, t, y = inputs(src)
    assert torch.equal(outputs(net, x, t, y), outputs(src, x, t, y))
    assert ("'ema' entry" in message) == (layout != "official")
    if layout == "repa":  # the projectors are named and counted, not silently dropped
        assert "ignored 4 'projectors.*' tensors (REPA's representation-alignment projectors" in message


# ---------------------------------------------------------------- item 3: diffusers


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, map_location="cpu", weights_only=True)  # made by the official DiT code


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_diffusers_folder_reproduces_the_official_model(tmp_path, reference, variant):
    """The official tiny DiT's weights in diffusers' layout (saved by diffusers itself, fp32 or the fp16 variant)
    load into our DiT with the OFFICIAL outputs, not diffusers' own numerics."""
    from backbones.diffusers_dit import to_diffusers_model

    official = DiT(**reference["config"]).eval()
    official.load_state_dict(reference["state_dict"])
    model = to_diffusers_model(official)
    folder = tmp_path / "DiT-tiny-diffusers"
    (model.half() if variant else model).save_pretrained(folder / "transformer", variant=variant)
    assert {p.name for p in (folder / "transformer").iterdir()} >= {
        "config.json", f"diffusion_pytorch_model{'.fp16' if variant else ''}.safetensors"}
    cfg = {"_target_": "backbones.dit.DiT", **reference["config"]}
    net = load_network(folder, cfg)
    if variant:  # the official model holding the same fp16-rounded weights
        official.load_state_dict({k: v if k == "pos_embed" else v.half().float()  # pos_embed is recomputed
                                  for k, v in reference["state_dict"].items()})
        want = outputs(official, reference["x"], reference["t"], reference["y"])
    else:
        want = reference["out"]
    got = outputs(net, reference["x"], reference["t"], reference["y"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_diffusers_mapping_matches_diffusers_forward(tmp_path, monkeypatch):
    """Independent of our inverse mapping: a random diffusers model, loaded here and given diffusers' time
    frequencies (downscale_freq_shift=1), computes what diffusers computes."""
    import math

    model = random_diffusers(seed=4, norm_eps=1e-6)  # the official eps, so only the time frequencies differ
    model.save_pretrained(tmp_path / "dm")
    net = load_network(tmp_path / "dm", MODEL_CFG)
    half = net.t_embedder.frequency_embedding_size // 2

    def diffusers_frequencies(t):
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    monkeypatch.setattr(net.t_embedder, "timestep_embedding", diffusers_frequencies)
    x, t, y = inputs(net)
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(outputs(net, x, t, y), want, atol=1e-5, rtol=1e-5)


def test_diffusers_round_trip_and_refusal(tmp_path):
    from diffusers import DiTTransformer2DModel

    from backbones.diffusers_dit import export_diffusers

    model = random_diffusers(seed=6)
    model.save_pretrained(tmp_path / "a")
    net = load_network(tmp_path / "a", MODEL_CFG)
    export_diffusers(net, tmp_path / "b")
    back = DiTTransformer2DModel.from_pretrained(tmp_path / "b", subfolder="transformer")
    theirs, ours = model.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    with pytest.raises(FileExistsError):
        export_diffusers(net, tmp_path / "b")
    with torch.no_grad():  # one block's copy of the shared time embedder differs: no single DiT value exists
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    model.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match=r"blocks \[1\] hold a different timestep_embedder.linear_1.bias"):
        load_network(tmp_path / "c", MODEL_CFG)


def test_export_runs_in_diffusers_dit_pipeline(tmp_path):
    from diffusers import DiTPipeline

    from backbones.diffusers_dit import export_diffusers
    from datamodules.vae import build_tiny_autoencoder

    net = random_dit(seed=8)
    vae = build_tiny_autoencoder()
    folder = export_diffusers(net, tmp_path / "pipe", vae=vae)
    pipe = DiTPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.variance_type == "fixed_small" and pipe.scheduler.config.beta_end == 0.02
    # guidance_scale 1: DiTPipeline's null class is hard-coded to 1000 (ImageNet), this net has 5 classes
    images = pipe(class_labels=[0, 4], num_inference_steps=2, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert images.shape == (2, 8 * factor, 8 * factor, 3) and (images >= 0).all() and (images <= 1).all()
    state = pipe.transformer.state_dict()
    assert torch.equal(state["proj_out_2.weight"], net.final_layer.linear.weight)


# ---------------------------------------------------------------- item 6: a checkpoint must not choose what code runs


def _crafted(src: Path, dst: Path) -> dict:
    """Ways a stored config could name code: a foreign callable, a prefix of an allowed module reached by
    attribute access, a nested target inside an allowed one, and the data section evaluate.py builds."""
    copy = {"_target_": "shutil.copyfile", "_args_": [str(src), str(dst)]}
    return {
        "foreign": ("model", copy),
        "prefix_bypass": ("objective", {"_target_": "gen_objectives.module.torch.save", "obj": [1], "f": str(dst)}),
        "nested": ("model", {"_target_": "backbones.dit.DiT", "depth": {"_target_": "shutil.copyfile",
                                                                          "src": str(src), "dst": str(dst)}}),
        "data": ("data", {"_target_": "shutil.copyfile", "src": str(src), "dst": str(dst)}),
        "partial": ("objective", {"_target_": "gen_objectives.objectives.flow.FlowObjective", "_partial_": True}),
    }


@pytest.mark.parametrize("variant", ["foreign", "prefix_bypass", "nested", "data", "partial"])
def test_crafted_checkpoint_config_runs_nothing(tmp_path, lightning_ckpt, variant):
    from gen_objectives.module import GenerativeModule

    src, dst = tmp_path / "secret.txt", tmp_path / "stolen.txt"
    src.write_text("secret")
    ckpt = torch.load(lightning_ckpt, weights_only=True)
    section, value = _crafted(src, dst)[variant]
    ckpt["hyper_parameters"]["cfg"][section] = value
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(ValueError) as err:
        GenerativeModule.from_checkpoint(str(evil))
    assert not dst.exists(), "the checkpoint's config ran code"
    message = str(err.value)
    assert "\n" not in message and f"{section}" in message
    assert ("is not one of the project's own classes" in message) or ("is not allowed" in message)


def test_guard_allows_exactly_the_project_targets(lightning_ckpt):
    from omegaconf import OmegaConf

    from gen_objectives.module import GenerativeModule
    from workflow.config_guard import TRUSTED_TARGETS, UntrustedConfigError, instantiate_trusted

    used = {OmegaConf.load(p).get("_target_") for group in ("model", "objective", "data")
            for p in (REPO / "conf" / group).glob("*.yaml")}
    assert used <= TRUSTED_TARGETS, f"add {sorted(used - TRUSTED_TARGETS)} to workflow/config_guard.py"
    module = GenerativeModule.from_checkpoint(str(lightning_ckpt))  # the project's own file still loads
    ckpt = torch.load(lightning_ckpt, weights_only=True)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in module.ema.state_dict().items())
    obj = instantiate_trusted({"_target_": "gen_objectives.objectives.flow.FlowObjective", "path": "linear"}, "o")
    assert type(obj).__name__ == "FlowObjective"
    with pytest.raises(UntrustedConfigError, match="'backbones.dit'"):  # a module is not a class
        instantiate_trusted({"_target_": "backbones.dit"}, "model")


# ---------------------------------------------------------------- item 2: model.init_from


def test_init_from_loads_before_the_ema_copy(tmp_path):
    from hydra.utils import instantiate

    from backbones.checkpoint import build_network
    from gen_objectives.module import GenerativeModule

    src = random_dit(seed=11, input_size=8, in_channels=1, num_classes=10, depth=1, learn_sigma=False)
    path = write_sit_training(src, tmp_path / "0400000.pt")
    from checkpoint_files import compose

    cfg = compose("train", ["experiment=digits", "data.image_size=8", "model.hidden_size=32", "model.depth=1",
                            "model.num_heads=2", f"+model.init_from={path}"])
    torch.manual_seed(0)
    module = GenerativeModule(build_network(cfg.model, from_file=False), instantiate(cfg.objective))
    for k, v in src.state_dict().items():
        assert torch.equal(module.net.state_dict()[k], v), k
        assert torch.equal(module.ema.state_dict()[k], v), k  # the EMA starts from the loaded weights
    # a run rebuilt from its checkpoint does not read init_from again: its own weights are in the file
    stored = {**MODEL_CFG, "init_from": str(tmp_path / "gone.pt")}
    assert isinstance(build_network(stored, load_init=False), DiT)
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        build_network(stored)


def test_train_py_reads_model_init_from(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "absent.pt"
    proc = subprocess.run([sys.executable, "train.py", "experiment=digits", "logger=none", f"hydra.run.dir={tmp_path}",
                           "trainer.max_steps=1", f"+model.init_from={missing}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"checkpoint not found: {missing}" in proc.stderr
