"""Inputs besides an ImageFolder (HF parquet/arrow shards, ImageNet's flat val folder), the mean-only layout,
and 16-channel VAE latents from the cache through DiT (in_channels follows the VAE preset)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from latent_fixtures import CORRUPT, FILES, RES, SPEC, load_arrays
from PIL import Image

from datamodules.adm_crop import load_image
from datamodules.image_sources import FlatFolderSource, HFShardsSource
from datamodules.latent_cache import CacheMismatchError, CacheSpec, build_cache
from datamodules.latent_imagenet import LatentDataset, LatentImageNetDataModule
from datamodules.vae import VAE, build_tiny_autoencoder
from datamodules.vae_presets import vae_preset

pytest_plugins = ["latent_fixtures"]  # fixtures image_root, tiny_vae, full_cache

CONF = os.path.join(os.path.dirname(__file__), "..", "conf")
HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"}, "label": {"names": ["n01", "n02", "n03"], "_type": "ClassLabel"}}}}).encode()}


def _hf_table(image_root, files):
    """The hub layout's columns: image = {bytes, path}, label = int64 (what `datasets` writes)."""
    images = [{"bytes": (image_root / "train" / f).read_bytes(), "path": os.path.basename(f)} for f in files]
    labels = [int(f[2]) - 1 for f in files]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"image": pa.array(images, image_type), "label": pa.array(labels, pa.int64())}).replace_schema_metadata(HF_META)


def test_hf_parquet_shards_give_the_same_cache_as_the_image_folder(image_root, tiny_vae, full_cache, tmp_path):
    root = tmp_path / "imagenet-1k"
    (root / "data").mkdir(parents=True)
    table = _hf_table(image_root, FILES)  # the same images, in the same order, as the ImageFolder cache
    pq.write_table(table.slice(0, 7), root / "data" / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(table.slice(7), root / "data" / "train-00001-of-00002.parquet", row_group_size=3)
    pq.write_table(table.slice(0, 2), root / "data" / "validation-00000-of-00001.parquet")  # another split
    source = LatentImageNetDataModule(root=str(root), source="hf", split="train", vae=tiny_vae, resolution=RES,
                                      image_size=16).image_source()
    assert isinstance(source, HFShardsSource)
    listing = source.list()
    assert listing.keys[6:8] == ["data/train-00000-of-00002.parquet#6", "data/train-00001-of-00002.parquet#0"]
    assert listing.classes == ["n01", "n02", "n03"] and len(listing.keys) == len(FILES)
    meta = build_cache(source, tmp_path / "cache", SPEC, tiny_vae, batch_size=3, num_workers=1, progress=False,
                       max_failed_fraction=0.2)
    assert meta["source"]["kind"] == "hf" and meta["num_failed"] == 1  # the corrupt JPEG's bytes fail here too
    for name, arr in load_arrays(tmp_path / "cache").items():
        assert np.array_equal(arr, load_arrays(full_cache)[name]), name
    assert HFShardsSource(root, "validation").list().keys == [f"data/validation-00000-of-00001.parquet#{i}" for i in (0, 1)]


def test_hf_arrow_shards_from_save_to_disk_and_unlabelled_splits(image_root, tmp_path):
    folder = tmp_path / "saved" / "validation"
    folder.mkdir(parents=True)
    files = [f for f in FILES if f != CORRUPT][:3]
    table = _hf_table(image_root, files).replace_schema_metadata(None)
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:  # `datasets` format
        writer.write_table(table)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"label": {"names": ["a", "b", "c"]}}}))
    source = HFShardsSource(tmp_path / "saved", "validation")
    listing = source.list()
    assert listing.classes == ["a", "b", "c"] and listing.labels == [int(f[2]) - 1 for f in files]
    for key, f in zip(listing.keys, files):
        assert np.array_equal(np.asarray(source.open(key)), np.asarray(load_image(image_root / "train" / f)))
    test = tmp_path / "saved" / "test"
    test.mkdir()
    unlabelled = table.set_column(1, "label", pa.array([-1] * 3, pa.int64()))
    with pa.ipc.new_stream(test / "data-00000-of-00001.arrow", unlabelled.schema) as writer:
        writer.write_table(unlabelled)
    with pytest.raises(ValueError, match="unlabelled"):
        HFShardsSource(tmp_path / "saved", "test").list()
    with pytest.raises(FileNotFoundError, match="no 'train' shards"):
        HFShardsSource(tmp_path / "saved", "train").list()


def test_flat_val_folder_with_each_label_file_format(tmp_path):
    folder = tmp_path / "imagenet" / "val"
    folder.mkdir(parents=True)
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 2)]
    for i, name in enumerate(names):
        Image.new("RGB", (20 + i, 20), (i * 40, 0, 0)).save(folder / name)
    a, b = "n01440764", "n01443537"  # tench, goldfish: classes 0 and 1 in sorted-wnid order
    wnids = {"ILSVRC2012_val_00000001": b, "ILSVRC2012_val_00000002": a, "ILSVRC2012_val_00000003": b}
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(f"{k},{w} 1 2 3 4 {w} 5 6 7 8\n" for k, w in wnids.items()))
    pairs = tmp_path / "val.txt"
    pairs.write_text("".join(f"{k}.JPEG {w}\n" for k, w in wnids.items()))
    per_line = tmp_path / "synsets.txt"  # one wnid per line, in sorted file order
    per_line.write_text(f"{b}\n{a}\n{b}\n")
    for labels_file in (kaggle, pairs, per_line):
        listing = FlatFolderSource(tmp_path / "imagenet", "val", labels_file).list()
        assert listing.keys == sorted(names) and listing.classes == [a, b] and listing.labels == [1, 0, 1]
    indices = tmp_path / "caffe.txt"
    indices.write_text("".join(f"{k}.JPEG {i}\n" for i, k in enumerate(sorted(wnids))))
    assert FlatFolderSource(tmp_path / "imagenet", "val", indices).list().labels == [0, 1, 2]
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    with pytest.raises(ValueError, match="devkit"):
        FlatFolderSource(tmp_path / "imagenet", "val", devkit).list()
    pairs.write_text(f"ILSVRC2012_val_00000001.JPEG {b}\n")
    with pytest.raises(ValueError, match="no label for 2 image"):
        FlatFolderSource(tmp_path / "imagenet", "val", pairs).list()
    source = FlatFolderSource(tmp_path / "imagenet", "val", kaggle)
    assert np.asarray(source.open(sorted(names)[2]))[0, 0, 0] == 0  # ..._00000003.JPEG was written red=0
    assert source.identity()["labels_file"] == os.path.realpath(kaggle)
    with pytest.raises(ValueError, match="data.source=flat needs data.labels_file"):
        FlatFolderSource(tmp_path / "imagenet", "val", None)


def test_mean_only_layout_is_half_the_size_and_reads_the_means(image_root, tiny_vae, full_cache, tmp_path):
    spec = CacheSpec(vae="tiny-random", scale_factor=0.18215, resolution=RES, shard_size=4, layout="mean")
    from datamodules.image_sources import ImageFolderSource

    meta = build_cache(ImageFolderSource(image_root, "train"), tmp_path / "m", spec, tiny_vae, batch_size=3,
                       num_workers=0, progress=False, max_failed_fraction=0.2)
    assert meta["arrays"] == ["mean"] and not (tmp_path / "m" / "std.npy").exists()
    assert "channel_std_sampled" not in meta and meta["channel_std"] == json.loads(
        (full_cache / "metadata.json").read_text())["channel_std"]
    assert (tmp_path / "m" / "mean.npy").read_bytes() == (full_cache / "mean.npy").read_bytes()
    sizes = [sum((c / f"{n}.npy").stat().st_size for n in meta_arrays) for c, meta_arrays in
             ((tmp_path / "m", ["mean"]), (full_cache, ["mean", "std"]))]
    assert sizes[0] * 2 - sizes[1] < 1000  # half, up to one .npy header
    x, _ = LatentDataset(tmp_path / "m", 0.18215, sample_posterior=False, random_flip=False).__getitems__([0])
    valid = np.flatnonzero(load_arrays(full_cache)["labels"] >= 0)
    np.testing.assert_allclose(x[0].numpy(), load_arrays(full_cache)["mean"][valid[0], 0] * np.float32(0.18215),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="data.sample_posterior=true needs data.layout=mean_std"):
        LatentImageNetDataModule(cache_dir=str(tmp_path / "m"), vae=tiny_vae, resolution=RES, image_size=16,
                                 layout="mean", sample_posterior=True)
    dm = LatentImageNetDataModule(cache_dir=str(tmp_path / "m"), vae=tiny_vae, resolution=RES, image_size=16,
                                  num_workers=0)  # layout mean_std asked of a mean-only cache
    with pytest.raises(CacheMismatchError, match="layout: cache has 'mean'"):
        dm.setup()


def test_16_channel_latents_normalised_with_shift_train_dit(image_root, tmp_path):
    sd3 = vae_preset("sd3")
    model = build_tiny_autoencoder(levels=2, latent_channels=16, scaling_factor=sd3["scale"], shift_factor=sd3["shift"])
    vae = VAE(model, scale_factor=sd3["scale"], shift_factor=sd3["shift"], device="cpu", name="sd3-tiny")
    dm = LatentImageNetDataModule(root=str(image_root), cache_dir=str(tmp_path / "c16"), vae=vae, resolution=RES,
                                  image_size=16, batch_size=4, num_workers=0, encode_num_workers=0, shard_size=4,
                                  encode_batch_size=4, max_failed_fraction=0.2, sample_posterior=False, progress=False)
    meta = dm.build_cache()
    assert meta["latent_shape"] == [2, 16, 16, 16] and meta["shift_factor"] == sd3["shift"]
    z = np.load(tmp_path / "c16" / "mean.npy")[np.load(tmp_path / "c16" / "labels.npy") >= 0].astype(np.float64)
    x_all = (z - sd3["shift"]) * sd3["scale"]  # what training sees, over both flips
    np.testing.assert_allclose(meta["channel_mean"], x_all.mean((0, 1, 3, 4)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(meta["channel_std"], x_all.std((0, 1, 3, 4)), rtol=1e-5)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16, 16, 16)
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base=None):
        cfg = compose("train", overrides=["data=latent_imagenet", "data/vae=sd3", "model=dit_tiny", "objective=diffusion",
                                          "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                          "model.input_size=16"])
    assert cfg.model.in_channels == 16 and cfg.data.channels == 16
    net, objective = instantiate(cfg.model), instantiate(cfg.objective)
    loss = objective.loss(net, x, y).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    images = dm.decode(x)  # decode inverts (x / scale + shift) back to the VAE's z
    torch.testing.assert_close(images, model.decode(x / sd3["scale"] + sd3["shift"]).sample.clamp(-1, 1))
