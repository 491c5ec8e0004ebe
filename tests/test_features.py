"""Feature extractors: Inception loading from a local file (never the network), the missing-weights
message, ADM's sFID layer, the evaluation matmul precision, and the cached digits CNN."""

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from datamodules.digits import load_digits_tensors
from evaluation.features import INCEPTION_FILE, DigitsFeatures, InceptionFeatures
from evaluation.matmul import matmul_precision
from evaluation.stats import quantize


def test_missing_inception_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures(cache_dir=str(tmp_path), download=False)
    msg = str(err.value)
    assert "make assets" in msg and INCEPTION_FILE in msg and "weights_path" in msg
    assert str(tmp_path / INCEPTION_FILE) in msg and "https://" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):  # an explicit path is never replaced by a download
        InceptionFeatures(weights_path=str(tmp_path / "nowhere.pth"), download=True)


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """A weights file with the real layout but random values, written without any download."""
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    empty = path.with_name("empty.pth")
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(net.state_dict(), path)
    return path


def test_inception_loads_local_file_and_extracts(random_inception_file, tmp_path):
    torch.set_num_threads(1)
    ext = InceptionFeatures(weights_path=str(random_inception_file))
    ref = torch.load(random_inception_file, weights_only=False)
    assert torch.equal(ext.net.fc.weight, ref["fc.weight"])  # the file's weights, not a download
    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = {}
    block = ext.net.Mixed_6d.branch1x1  # TF's mixed_6/conv: conv, batch norm, ReLU
    hook = block.conv.register_forward_hook(lambda m, i, o: seen.update(conv=o.detach().clone()))
    try:
        feats = ext(gray)
    finally:
        hook.remove()
    pool, spatial, logits = feats["pool"], feats["spatial"], feats["logits"]
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, 2023)
    # sFID features written out from the conv output: BN (eval), ReLU, first 7 channels, TF's NHWC order
    bn = block.bn
    y = torch.relu((seen["conv"] - bn.running_mean[None, :, None, None])
                   / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps) * bn.weight[None, :, None, None]
                   + bn.bias[None, :, None, None])
    assert y.shape[-2:] == (17, 17)
    torch.testing.assert_close(spatial, y[:, :7].permute(0, 2, 3, 1).reshape(2, -1), rtol=1e-5, atol=1e-5)
    # IS logits are the bias-free projection of the pool features, as in ADM's evaluator
    torch.testing.assert_close(logits, pool @ ext.net.fc.weight.T, rtol=1e-4, atol=1e-4)
    # grayscale samples are replicated to RGB
    rgb = ext(gray[1:].expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(pool[1:], rgb["pool"])
    torch.testing.assert_close(spatial[1:], rgb["spatial"])
    with pytest.raises(TypeError, match="uint8"):
        ext(gray.float())
    # found through the cache directory as well as through the explicit path
    (tmp_path / INCEPTION_FILE).symlink_to(random_inception_file)
    assert InceptionFeatures(cache_dir=str(tmp_path)).weights_file == str(tmp_path / INCEPTION_FILE)


def test_matmul_precision_is_set_and_restored():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    try:
        a, b = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), torch.randn(64, 64)
        with matmul_precision("highest"):
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
            exact = a @ b
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
        torch.testing.assert_close(exact, (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="choose one of"):
            with matmul_precision("tf32"):
                pass
    finally:
        torch.set_float32_matmul_precision(before)


def test_digits_classifier_trains_caches_and_classifies(tmp_path, capsys):
    torch.set_num_threads(1)
    ext = DigitsFeatures(image_size=8, epochs=3, cache_dir=str(tmp_path))
    assert ext.cache_file.is_file() and "trained" in capsys.readouterr().out
    assert ext.val_accuracy > 0.7  # chance is 0.1; 30 epochs (the default) reach ~0.98
    again = DigitsFeatures(image_size=8, epochs=3, cache_dir=str(tmp_path))
    assert "trained" not in capsys.readouterr().out  # loaded, not retrained
    assert again.name == ext.name and again.val_accuracy == ext.val_accuracy
    other = DigitsFeatures(image_size=8, epochs=1, cache_dir=str(tmp_path))
    assert other.name != ext.name  # settings are part of the cache key

    x, y = load_digits_tensors(8)
    out = again(quantize(x[:200]))
    feats, logits = out["pool"], out["logits"]
    assert feats.shape == (200, 64) and (feats >= 0).all()
    assert (logits.argmax(1) == y[:200]).float().mean() > 0.7
    with pytest.raises(ValueError, match="image_size"):
        again(quantize(load_digits_tensors(16)[0][:2]))
