"""The VAE wrapper on a tiny random AutoencoderKL, and its offline failure messages (no network used)."""

import time

import pytest
import torch

from datamodules import vae as vae_mod
from datamodules.vae import VAE, VAEUnavailableError, build_tiny_autoencoder, load_autoencoder


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
    assert loaded.name == "some-org/some-vae"
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
    with pytest.raises(ValueError, match="vae dtype"):
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
