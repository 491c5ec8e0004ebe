"""DiT: official-layout parity, parameter counts, adaLN-Zero, label dropout, compile, checkpointing, loading."""

import argparse
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from backbones.checkpoint import load_dit_checkpoint
from backbones.dit import DIT_PRESETS, DiT, dit_preset, sincos_pos_embed_2d

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "dit_official_tiny.pt"
TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def reference():
    # produced by the official DiT code (config, perturbed weights, inputs, eval-mode output); data only
    return torch.load(REFERENCE, map_location="cpu", weights_only=True)


def randomized(model: DiT, seed: int = 0) -> DiT:
    """Perturb every weight so that adaLN-Zero does not hide wiring mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def tiny_inputs(model: DiT, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


# ---------------------------------------------------------------- official parity


def test_state_dict_keys_and_shapes_match_official(reference):
    model = DiT(**reference["config"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    assert ours == theirs
    # the null-class row exists because class_dropout_prob > 0
    assert ours["y_embedder.embedding_table.weight"][0] == reference["config"]["num_classes"] + 1


def test_forward_matches_official_output(reference):
    model = DiT(**reference["config"]).eval()
    model.load_state_dict(reference["state_dict"], strict=True)
    with torch.no_grad():
        out = model(reference["x"], reference["t"], reference["y"])
    assert out.shape == reference["out"].shape
    torch.testing.assert_close(out, reference["out"], atol=1e-5, rtol=0)
    # the reference batch uses the null class (index num_classes) directly, as CFG sampling does
    assert int(reference["y"].max()) == reference["config"]["num_classes"]


def test_pos_embed_is_fixed_2d_sincos(reference):
    model = DiT(**reference["config"])
    torch.testing.assert_close(model.pos_embed, reference["state_dict"]["pos_embed"], atol=1e-6, rtol=0)
    assert not model.pos_embed.requires_grad
    table = sincos_pos_embed_2d(16, 4)  # [16 tokens, 16 dims], token n = row * 4 + col
    grid = table.view(4, 4, 16)
    # first half encodes the column only, second half the row only (the official layout)
    assert torch.allclose(grid[:, :, :8], grid[:1, :, :8].expand(4, 4, 8))
    assert torch.allclose(grid[:, :, 8:], grid[:, :1, 8:].expand(4, 4, 8))
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([(3 * omega).sin(), (3 * omega).cos(), (2 * omega).sin(), (2 * omega).cos()])
    torch.testing.assert_close(grid[2, 3], expected.float())


# ---------------------------------------------------------------- sizes and validation


@pytest.mark.parametrize("name, learn_sigma, expected", [
    ("B/2", True, 130_512_416),
    ("XL/2", True, 675_129_632),
])
def test_parameter_counts_on_meta(name, learn_sigma, expected):
    with torch.device("meta"):
        model = DiT(**dit_preset(name, learn_sigma=learn_sigma))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.out_channels == 8 and model.num_classes == 1000


def test_presets_and_out_channels():
    assert DIT_PRESETS["S"] == dict(depth=12, hidden_size=384, num_heads=6)
    assert DIT_PRESETS["L"] == dict(depth=24, hidden_size=1024, num_heads=16)
    kwargs = dit_preset("XL/4", learn_sigma=False)
    assert (kwargs["patch_size"], kwargs["hidden_size"], kwargs["depth"]) == (4, 1152, 28)
    with torch.device("meta"):
        assert DiT(**kwargs).out_channels == 4
    with pytest.raises(ValueError, match="XXL"):
        dit_preset("XXL/2")


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=10, patch_size=4), "input_size=10.*patch_size=4"),
    (dict(hidden_size=36, num_heads=5), "hidden_size=36.*num_heads=5"),
    (dict(hidden_size=6, num_heads=3), "hidden_size=6"),
])
def test_bad_combinations_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiT(**{**TINY, **kwargs})


@pytest.mark.parametrize("name, expected", [("dit_b", 130_512_416), ("dit_xl", 675_129_632)])
def test_hydra_configs_instantiate(name, expected):
    from hydra.utils import instantiate

    cfg = OmegaConf.merge(
        {"data": {"image_size": 32, "channels": 4, "num_classes": 1000}, "objective": {"learn_sigma": True}},
        {"model": OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")},
    )
    assert cfg.model.patch_size == 2 and cfg.model.grad_checkpointing is False
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("image_size", [8, 16])
def test_tiny_config_runs_on_digits(image_size):
    from hydra.utils import instantiate

    cfg = OmegaConf.merge(
        {"data": {"image_size": image_size, "channels": 1, "num_classes": 10}, "objective": {"learn_sigma": False}},
        {"model": OmegaConf.load(REPO / "conf" / "model" / "dit_tiny.yaml")},
    )
    model = randomized(instantiate(cfg.model))
    x, t, y = tiny_inputs(model, batch=4)
    out = model(x, t, y)
    assert out.shape == (4, 1, image_size, image_size) and torch.isfinite(out).all()


# ---------------------------------------------------------------- initialisation and conditioning


def test_adaln_zero_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    model = DiT(**TINY, learn_sigma=True).eval()
    x, t, y = tiny_inputs(model)
    out = model(x, t, y)
    assert out.shape == (3, 6, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    # and every block is the identity at init, so the trunk is the patch embedding plus positions
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    assert torch.equal(model.blocks[0](h, c), h)


def test_output_depends_on_t_and_y():
    model = randomized(DiT(**TINY)).eval()
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        base = model(x, t, y)
        assert not torch.allclose(base, model(x, t + 50, y))
        assert not torch.allclose(base, model(x, t, (y + 1) % 5))


def test_label_dropout_train_only_at_rate():
    torch.manual_seed(0)
    emb = DiT(**TINY, class_dropout_prob=0.1).y_embedder
    labels = torch.randint(0, 5, (40_000,))
    dropped = emb.token_drop(labels) == 5
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    null_row = emb.embedding_table.weight[5]
    trained = emb(labels, train=True)
    frac = (trained == null_row).all(dim=1).float().mean().item()
    assert 0.09 < frac < 0.11
    # eval never drops
    torch.testing.assert_close(emb(labels, train=False), emb.embedding_table(labels))
    # no null row and no dropout when class_dropout_prob == 0
    emb0 = DiT(**TINY, class_dropout_prob=0.0).y_embedder
    assert emb0.embedding_table.num_embeddings == 5
    torch.testing.assert_close(emb0(labels, train=True), emb0.embedding_table(labels))
    with pytest.raises(ValueError, match="null class"):
        emb0(labels[:4], train=False, force_drop_ids=torch.ones(4, dtype=torch.long))


def test_force_drop_ids_is_exact_in_both_modes():
    model = randomized(DiT(**TINY))
    x, t, y = tiny_inputs(model, batch=4)
    force = torch.tensor([1, 0, 1, 0])
    expected_y = torch.where(force == 1, 5, y)
    model.eval()
    with torch.no_grad():
        want = model(x, t, expected_y)
        torch.testing.assert_close(model(x, t, y, force_drop_ids=force), want)
        model.train()  # forced ids override random dropout in training too
        for _ in range(3):
            torch.testing.assert_close(model(x, t, y, force_drop_ids=force), want)


def test_training_mode_drops_labels_in_forward():
    model = randomized(DiT(**TINY, class_dropout_prob=0.5))
    x, t, y = tiny_inputs(model, batch=64)
    with torch.no_grad():
        model.eval()
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
        model.train()
        torch.manual_seed(1)
        out = model(x, t, y)
    as_cond = (out - cond).flatten(1).abs().amax(1) < 1e-5
    as_uncond = (out - uncond).flatten(1).abs().amax(1) < 1e-5
    assert bool((as_cond ^ as_uncond).all())  # every sample is either kept or dropped
    assert 16 < int(as_uncond.sum()) < 48


# ---------------------------------------------------------------- compile and activation checkpointing


def test_compiles_fullgraph_without_graph_breaks():
    torch._dynamo.reset()
    model = randomized(DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2,
                           num_classes=3, learn_sigma=True))
    x, t, y = tiny_inputs(model, batch=2)
    # fullgraph=True raises on any graph break; aot_eager also traces the backward without a C++ toolchain
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
        force = torch.tensor([1, 0])
        torch.testing.assert_close(compiled(x, t, y, force_drop_ids=force), model(x, t, y, force_drop_ids=force))
    model.train()
    compiled(x, t, y).square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.slow
def test_compiles_with_inductor_fullgraph():
    torch._dynamo.reset()
    model = randomized(DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2,
                           num_classes=3)).eval()
    x, t, y = tiny_inputs(model, batch=2)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_gives_same_grads():
    base = randomized(DiT(**TINY)).train()
    ckpt = randomized(DiT(**TINY, grad_checkpointing=True)).train()
    ckpt.load_state_dict(base.state_dict())
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x, t, y = tiny_inputs(base, batch=4)
    keep = torch.zeros(4, dtype=torch.long)  # no random label dropout, so both see the same labels
    for model in (base, ckpt):
        model(x, t, y, force_drop_ids=keep).square().mean().backward()
    assert len(calls) == 2  # the block ran again during backward: activations were recomputed
    for (name, p), q in zip(base.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    # no recomputation in eval or under no_grad
    ckpt.eval()
    with torch.no_grad():
        ckpt(x, t, y)
    assert len(calls) == 3


def test_bf16_autocast_forward_backward():
    model = randomized(DiT(**TINY)).train()
    x, t, y = tiny_inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- checkpoint files


@pytest.fixture()
def weights():
    model = randomized(DiT(**TINY), seed=3)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_load_plain_state_dict(tmp_path, weights):
    path = tmp_path / "DiT-tiny.pt"
    torch.save(weights, path)
    model = DiT(**TINY)
    message = load_dit_checkpoint(model, path)
    assert "plain state dict" in message and str(path) in message
    _assert_loaded(model, weights)


def test_load_training_checkpoint_prefers_ema(tmp_path, weights):
    other = {k: torch.zeros_like(v) for k, v in weights.items()}
    # the official DiT/SiT training layout: model, ema, opt and an argparse.Namespace of args
    path = tmp_path / "0400000.pt"
    torch.save({"model": other, "ema": weights, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256)}, path)
    model = DiT(**TINY)
    assert "'ema' entry" in load_dit_checkpoint(model, path)
    _assert_loaded(model, weights)


@pytest.mark.parametrize("entry, prefix", [("model", "module."), ("state_dict", "_orig_mod."),
                                           ("state_dict", "module._orig_mod.")])
def test_load_entries_and_strip_prefixes(tmp_path, weights, entry, prefix):
    path = tmp_path / "ckpt.pt"
    torch.save({entry: {prefix + k: v for k, v in weights.items()}, "step": 7}, path)
    model = DiT(**TINY)
    assert f"'{entry}' entry" in load_dit_checkpoint(model, path)
    _assert_loaded(model, weights)


def test_load_safetensors(tmp_path, weights):
    from safetensors.torch import save_file

    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    model = DiT(**TINY)
    assert "plain state dict" in load_dit_checkpoint(model, path)
    _assert_loaded(model, weights)


def test_load_rejects_mismatch_and_missing_weights(tmp_path, weights):
    path = tmp_path / "ckpt.pt"
    torch.save({k: v for k, v in weights.items() if k != "final_layer.linear.bias"}, path)
    with pytest.raises(RuntimeError, match="final_layer.linear.bias"):
        load_dit_checkpoint(DiT(**TINY), path)
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="ema"):
        load_dit_checkpoint(DiT(**TINY), path)
    with pytest.raises(FileNotFoundError):
        load_dit_checkpoint(DiT(**TINY), tmp_path / "absent.pt")


class _Payload:
    """An object whose unpickling would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_load_refuses_arbitrary_pickles(tmp_path, weights):
    path = tmp_path / "evil.pt"
    torch.save({"ema": weights, "extra": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_dit_checkpoint(DiT(**TINY), path)


# ---------------------------------------------------------------- same seed, same start (issue #10 item 2)


def build_seeded(seed: int, **kw) -> tuple[DiT, torch.Tensor]:
    """A DiT built right after seeding the global RNG, and the global RNG state construction left behind."""
    torch.manual_seed(seed)
    model = DiT(**TINY, **kw)
    return model, torch.get_rng_state()


@pytest.mark.parametrize("other", [dict(learn_sigma=False), dict(learn_sigma=False, grad_checkpointing=True)])
def test_options_do_not_change_shared_initial_weights_or_the_global_rng(other):
    """Objectives that differ in learn_sigma (output channels) start from the same shared weights and RNG stream."""
    a, rng_a = build_seeded(0, learn_sigma=True)
    b, rng_b = build_seeded(0, **other)
    sa, sb = a.state_dict(), b.state_dict()
    shared = [k for k in sa if sa[k].shape == sb[k].shape]
    assert len(shared) == len(sa) - 2  # all but final_layer.linear.{weight,bias}
    differ = [k for k in shared if not torch.equal(sa[k], sb[k])]
    assert differ == []
    assert torch.equal(rng_a, rng_b)
    # and so the label-dropout masks drawn next (training's first forward) are equal
    labels = torch.arange(64) % 5
    torch.set_rng_state(rng_a)
    mask_a = a.y_embedder.token_drop(labels) == 5
    torch.set_rng_state(rng_b)
    mask_b = b.y_embedder.token_drop(labels) == 5
    assert torch.equal(mask_a, mask_b) and 0 < int(mask_a.sum()) < 64


def test_initial_weights_follow_the_seed_and_the_official_init():
    a, _ = build_seeded(0)
    b, _ = build_seeded(0)
    c, _ = build_seeded(1)
    for (k, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), k
        if k.endswith("weight") and pa.abs().sum() > 0 and "pos_embed" not in k:
            assert not torch.equal(pa, pc), k
    w = a.blocks[0].attn.qkv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and torch.equal(a.blocks[0].attn.qkv.bias, torch.zeros(96))
    assert abs(a.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.004
    assert torch.equal(a.final_layer.linear.weight, torch.zeros_like(a.final_layer.linear.weight))
    assert torch.equal(a.blocks[1].adaLN_modulation[-1].weight, torch.zeros(192, 32))
    torch.testing.assert_close(a.pos_embed[0], sincos_pos_embed_2d(32, 4))


def test_cfg_without_a_null_class_says_so():
    """class_dropout_prob = 0 builds no null row: guidance must say so, not raise a bare IndexError."""
    from gen_objectives.objectives import FlowObjective

    model = DiT(**TINY, class_dropout_prob=0.0, learn_sigma=False).eval()
    x, _, y = tiny_inputs(model)
    obj = FlowObjective(num_classes=5)
    with pytest.raises(ValueError, match="no null class.*class_dropout_prob"):
        obj.sample(model, x, y, sampler="euler", num_steps=3, cfg_scale=1.5)
    with pytest.raises(ValueError, match="no null class"):
        model(x, torch.zeros(3), torch.full_like(y, 5))
