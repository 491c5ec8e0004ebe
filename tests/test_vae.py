"""The VAE wrapper on a tiny random AutoencoderKL, and its offline failure messages (no network used)."""

import time

import pytest
import torch

from datamodules import vae as vae_mod
from datamodules.vae import (
    VAE,
    VAEUnavailableError,
    build_tiny_autoencoder,
    load_autoencoder,
    weights_sha256,
)
from datamodules.vae_presets import vae_preset, vae_presets


@pytest.fixture(scope="module")
def tiny():
    return VAE(build_tiny_autoencoder(levels=2), scale_factor=0.18215, device="cpu", name="tiny")


def test_tiny_vae_builds_fast_and_round_trips_shapes(tiny):
    start = time.perf_counter()
    model = build_tiny_autoencoder(levels=2)
    assert time.perf_counter() - start < 5.0
    assert sum(p.numel() for p in model.parameters()) < 100_000
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    mean, std = tiny.encode_moments(images)
    assert mean.shape == std.shape == (3, 4, 16, 16)
    assert mean.dtype == torch.float32 and (std > 0).all()
    assert tiny.downsample == 2 and tiny.latent_channels == 4 and tiny.dtype == torch.float32
    out = tiny.decode(tiny.encode(images))
    assert out.shape == (3, 3, 32, 32)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_encode_is_scaled_mean_and_sample_adds_posterior_noise(tiny):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = tiny.encode_moments(images)
    torch.testing.assert_close(tiny.encode(images), mean * 0.18215)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tiny.encode(images, sample=True, generator=gen), (mean + std * noise) * 0.18215)


def test_decode_divides_by_the_scale_factor(tiny):
    latents = torch.randn(2, 4, 16, 16)
    direct = tiny.model.decode(latents / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(tiny.decode(latents), direct)


def test_local_folder_loads_the_saved_weights(tmp_path):
    model = build_tiny_autoencoder(levels=2, seed=5)
    model.save_pretrained(tmp_path / "tiny-vae")
    loaded = VAE("some-org/some-vae", local_path=tmp_path / "tiny-vae", device="cpu")
    assert loaded.name == "some-org/some-vae" and loaded.weights_info["source"] == "local"
    assert loaded.weights_info["sha256"] == weights_sha256(model)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_missing_local_folder_says_what_to_download_and_which_key(tmp_path):
    with pytest.raises(VAEUnavailableError) as err:
        load_autoencoder("stabilityai/sd-vae-ft-ema", local_path=tmp_path / "nowhere")
    msg = str(err.value)
    assert "make assets" in msg and "data.vae_local_path" in msg and "stabilityai/sd-vae-ft-ema" in msg


def test_offline_without_a_cached_copy_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(VAEUnavailableError) as err:
        load_autoencoder("no-such-org-for-tests/no-such-vae")
    assert time.perf_counter() - start < 10.0
    assert "HF_HUB_OFFLINE" in str(err.value) and "make assets" in str(err.value)


def test_unreachable_hub_fails_without_trying_to_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(vae_mod, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(VAEUnavailableError) as err:
        load_autoencoder("no-such-org-for-tests/no-such-vae")
    assert "unreachable" in str(err.value) and "data.vae_local_path" in str(err.value)


def test_rejects_other_objects_and_bad_dtypes():
    with pytest.raises(TypeError):
        VAE(object())
    with pytest.raises(ValueError, match="data.vae_dtype='int8' is not one of"):
        VAE(build_tiny_autoencoder(), device="cpu", dtype="int8")


def test_make_assets_offline_fails_fast_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from datamodules import assets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert assets.main(["--out", str(tmp_path / "assets")]) == 1
    assert time.perf_counter() - start < 10.0 and not (tmp_path / "assets").exists()
    err = capsys.readouterr().err
    assert "make assets" in err and "data.vae_local_path" in err and "callbacks.fid.extractor.weights_path" in err
    assert assets.inception_url().startswith("https://") and assets.inception_url().endswith(".pth")


# The presets researchers use now, as the issue lists them: (name, latent channels, scale, shift).
PRESETS = [("sd-vae-ft-ema", 4, 0.18215, 0.0), ("sd-vae-ft-mse", 4, 0.18215, 0.0), ("sdxl", 4, 0.13025, 0.0),
           ("sd3", 16, 1.5305, 0.0609), ("flux", 16, 0.3611, 0.1159)]


def test_preset_table_matches_the_published_factors():
    assert vae_presets() == sorted(name for name, *_ in PRESETS)
    for name, channels, scale, shift in PRESETS:
        preset = vae_preset(name)
        assert (preset["name"], preset["channels"], preset["scale"], preset["shift"], preset["downsample"]) == (
            name, channels, scale, shift, 8), name
    with pytest.raises(ValueError, match="data/vae='nope' is not one of"):
        vae_preset("nope")


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_encode_is_shifted_and_scaled_and_decode_inverts_it(name):
    """Tiny random AutoencoderKLs with 4 and 16 latent channels carrying the preset's own config factors."""
    p = vae_preset(name)
    model = build_tiny_autoencoder(levels=2, latent_channels=p["channels"], scaling_factor=p["scale"],
                                   shift_factor=p["shift"] or None)
    vae = VAE(model, scale_factor=p["scale"], shift_factor=p["shift"], device="cpu", name=name)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, _ = vae.encode_moments(images)
    assert mean.shape == (2, p["channels"], 16, 16)
    torch.testing.assert_close(vae.encode(images), (mean - p["shift"]) * p["scale"], rtol=0, atol=0)
    x = torch.randn(2, p["channels"], 16, 16, dtype=torch.float64)
    torch.testing.assert_close(vae.denormalize(vae.normalize(x)), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vae.normalize(vae.denormalize(x)), x, rtol=1e-12, atol=1e-12)
    latents = torch.randn(2, p["channels"], 16, 16)
    direct = model.decode(latents / p["scale"] + p["shift"]).sample.clamp(-1, 1)
    torch.testing.assert_close(vae.decode(latents), direct)


def test_a_preset_that_disagrees_with_the_weights_config_fails():
    sd3_like = build_tiny_autoencoder(levels=2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    with pytest.raises(ValueError, match=r"data.vae.scale=0.18215 but the loaded VAE's config.json says "
                                         r"scaling_factor=1.5305"):
        VAE(sd3_like, scale_factor=0.18215, device="cpu")
    with pytest.raises(ValueError, match="data.vae.shift=0.0 .* shift_factor=0.0609"):
        VAE(sd3_like, scale_factor=1.5305, shift_factor=0.0, device="cpu")
