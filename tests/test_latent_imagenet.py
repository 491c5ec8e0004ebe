"""ADM crop, the sharded/resumable latent cache and LatentImageNetDataModule on a JPEG folder written here."""

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from latent_fixtures import CORRUPT, FILES, IMAGES, RES, SPEC, copy_cache, load_arrays
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.adm_crop import adm_center_crop, adm_resize_plan, list_image_folder, preprocess
from datamodules.image_sources import ImageFolderSource
from datamodules.latent_cache import (
    SHARD_DIR,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    build_cache,
    encode_shards,
    finalize_cache,
    is_complete,
    shard_path,
)
from datamodules.latent_imagenet import LatentDataset, LatentImageNetDataModule, collate_latents, main
from datamodules.vae import VAE, VAEUnavailableError, build_tiny_autoencoder

pytest_plugins = ["latent_fixtures"]  # fixtures image_root, tiny_vae, full_cache

# CLI overrides for the tiny VAE saved in a local folder (downsample 2: 32 px -> 16 x 16 latents)
TINY_CLI = ["data.vae.name=tiny-random", "data.vae.hub_id=tiny-org/tiny-random", "data.vae.downsample=2",
            f"data.resolution={RES}", "data.image_size=16", "data.shard_size=4", "data.encode_batch_size=3",
            "data.encode_num_workers=0", "data.progress=false", "data.max_failed_fraction=0.2"]


def train_source(root):
    return ImageFolderSource(root, "train")


@pytest.mark.parametrize("size, expected", [
    ((300, 130, 32), [(150, 65, "box"), (75, 32, "box"), (75, 32, "bicubic")]),
    ((50, 40, 32), [(40, 32, "bicubic")]),
    ((20, 25, 32), [(32, 40, "bicubic")]),
    ((600, 600, 256), [(300, 300, "box"), (256, 256, "bicubic")]),
    ((500, 375, 256), [(341, 256, "bicubic")]),            # 500 * 256/375 = 341.33
    ((1024, 768, 256), [(512, 384, "box"), (341, 256, "bicubic")]),
    ((2000, 1001, 256), [(1000, 500, "box"), (512, 256, "bicubic")]),
])
def test_adm_resize_plan_matches_hand_computed_sizes(size, expected):
    assert adm_resize_plan(*size) == expected


def test_adm_center_crop_equals_the_rule_applied_by_hand():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(130, 300, 3), dtype=np.uint8))
    by_hand = img.resize((150, 65), Image.BOX).resize((75, 32), Image.BOX).resize((75, 32), Image.BICUBIC)
    by_hand = np.asarray(by_hand)[0:32, 21:53]  # left = (75 - 32) // 2 = 21
    assert np.array_equal(np.asarray(adm_center_crop(img, 32)), by_hand)
    small = Image.fromarray(rng.integers(0, 256, size=(25, 20, 3), dtype=np.uint8))
    up = np.asarray(small.resize((32, 40), Image.BICUBIC))[4:36]  # top = (40 - 32) // 2 = 4
    assert np.array_equal(np.asarray(adm_center_crop(small, 32)), up)


def test_preprocess_gives_rgb_in_minus_one_one(image_root):
    x = preprocess(image_root / "train" / "n01" / "d.JPEG", RES)  # grayscale source
    assert x.shape == (3, RES, RES) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[0], x[1])


def test_image_folder_labels_by_sorted_wnid(image_root):
    files, labels, classes = list_image_folder(image_root / "train")
    assert classes == ["n01", "n02", "n03"]
    assert files == sorted(files) and "n03/notes.txt" not in files and CORRUPT in files
    assert len(files) == len(IMAGES) + 1
    assert [labels[files.index(f"{w}/{n}")] for w, n, _, _ in IMAGES] == [int(w[-1]) - 1 for w, _, _, _ in IMAGES]


def test_cache_equals_direct_encoding_and_reports_the_corrupt_file(image_root, tiny_vae, full_cache):
    meta = json.loads((full_cache / "metadata.json").read_text())
    assert meta["vae"] == "tiny-random" and meta["resolution"] == RES and meta["scale_factor"] == 0.18215
    assert meta["count"] == len(IMAGES) and meta["num_failed"] == 1 and meta["latent_shape"] == [2, 4, 16, 16]
    assert meta["num_files"] == len(FILES) and meta["source"]["split"] == "train" and meta["layout"] == "mean_std"
    report = json.loads((full_cache / "report.json").read_text())
    assert report["num_failed"] == 1 and report["failed"][0]["path"] == CORRUPT and report["failed"][0]["error"]
    rows = [line.split("\t") for line in (full_cache / "files.tsv").read_text().splitlines()]
    assert [key for _, key in rows] == FILES
    arrays = load_arrays(full_cache)
    assert arrays["mean"].dtype == np.float16 and arrays["mean"].shape == (len(FILES), 2, 4, 16, 16)
    ok = [i for i, f in enumerate(FILES) if f != CORRUPT]
    assert arrays["labels"].tolist() == [-1 if f == CORRUPT else int(f[2]) - 1 for f in FILES]
    assert not arrays["mean"][FILES.index(CORRUPT)].any()  # the failed row is zeros and left out by the loader
    images = torch.stack([preprocess(image_root / "train" / FILES[i], RES) for i in ok])
    for flip, batch in enumerate([images, images.flip(-1)]):
        mean, std = tiny_vae.encode_moments(batch)
        np.testing.assert_allclose(arrays["mean"][ok, flip], mean.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(arrays["std"][ok, flip], std.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.array_equal(arrays["mean"][:, 0], arrays["mean"][:, 1])  # the flips really differ


def test_killed_and_resumed_encode_equals_uninterrupted(image_root, tiny_vae, full_cache, tmp_path):
    cache = tmp_path / "cache"

    def die_after_first(shard):
        raise KeyboardInterrupt(f"simulated kill after shard {shard}")

    with pytest.raises(KeyboardInterrupt):
        build_cache(train_source(image_root), cache, SPEC, tiny_vae, batch_size=3, num_workers=0, progress=False,
                    on_shard_written=die_after_first)
    assert not is_complete(cache) and shard_path(cache, 0).is_file() and not shard_path(cache, 1).is_file()
    with pytest.raises(CacheIncompleteError, match="2 of 3 shards"):
        finalize_cache(cache)
    stale = shard_path(cache, 1).with_name(shard_path(cache, 1).name + ".tmp-999")
    stale.write_bytes(b"half a marker")  # what a kill during the write leaves behind
    stale_array = cache / "mean.npy.tmp-999"
    stale_array.write_bytes(b"half an array")  # what a kill while creating the arrays leaves behind
    resumed = []
    build_cache(train_source(image_root), cache, SPEC, tiny_vae, batch_size=3, num_workers=1, progress=False,
                on_shard_written=resumed.append, max_failed_fraction=0.2)
    assert resumed == [1, 2] and not stale.exists() and not stale_array.exists()
    for name, arr in load_arrays(cache).items():
        assert np.array_equal(arr, load_arrays(full_cache)[name]), name
    assert (cache / "files.tsv").read_text() == (full_cache / "files.tsv").read_text()


def _encode_rank(rank, image_root, cache, init_file, log_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    vae = VAE(build_tiny_autoencoder(levels=2), device="cpu", name="tiny-random")
    written = []
    build_cache(train_source(image_root), cache, SPEC, vae, batch_size=3, num_workers=0, progress=False, rank=rank,
                world_size=2, on_shard_written=written.append, max_failed_fraction=0.2)
    (log_dir / f"rank{rank}.json").write_text(json.dumps(written))
    torch.distributed.destroy_process_group()


def test_two_process_encode_covers_every_image_once(image_root, full_cache, tmp_path):
    cache = tmp_path / "cache"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_encode_rank, args=(r, image_root, cache, tmp_path / "pg", tmp_path))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:  # a hung rank must not outlive the test
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    by_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert by_rank == [[0, 2], [1]]  # rank r takes shards r::world
    assert (cache / "files.tsv").read_text() == (full_cache / "files.tsv").read_text()
    ref = load_arrays(full_cache)
    assert np.array_equal(load_arrays(cache)["labels"], ref["labels"])
    for name in ("mean", "std"):  # single-threaded children: equal up to one float16 rounding step
        np.testing.assert_allclose(load_arrays(cache)[name].astype(np.float32), ref[name].astype(np.float32),
                                   rtol=2e-3, atol=1e-4, err_msg=name)


def test_metadata_mismatch_fails_naming_both_values(image_root, full_cache, tiny_vae):
    for key, value, shown in [("vae", "sd-vae-ft-mse", "'tiny-random'"), ("resolution", 64, "32"),
                              ("scale", 0.13025, "0.18215"), ("shift", 0.0609, "0.0")]:
        preset = {"name": "tiny-random", "hub_id": "tiny-org/tiny", "subfolder": None, "revision": None,
                  "scale": 0.18215, "shift": 0.0, "channels": 4, "downsample": 2}
        kwargs = {"resolution": RES, "image_size": 16}
        if key == "vae":
            preset["name"] = value
        elif key == "resolution":
            kwargs.update(resolution=64, image_size=32)
        else:
            preset[key] = value
        dm = LatentImageNetDataModule(cache_dir=str(full_cache), num_workers=0, vae=preset, **kwargs)
        with pytest.raises(CacheMismatchError) as err:
            dm.setup()
        cache_key = {"scale": "scale_factor", "shift": "shift_factor"}.get(key, key)
        assert f"{cache_key}: cache has {shown}" in str(err.value) and str(value) in str(err.value)


def test_resuming_with_other_settings_refuses_to_mix_shards(image_root, tiny_vae, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        encode_shards(train_source(image_root), cache, SPEC, tiny_vae, num_workers=0, progress=False,
                      on_shard_written=lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    other = CacheSpec(vae="tiny-random", scale_factor=0.18215, resolution=64, shard_size=4)
    with pytest.raises(CacheMismatchError, match="resolution: cache has 32"):
        encode_shards(train_source(image_root), cache, other, tiny_vae, num_workers=0, progress=False)
    other_weights = VAE(build_tiny_autoencoder(levels=2, seed=1), device="cpu", name="tiny-random")
    with pytest.raises(CacheMismatchError, match="other VAE weights"):
        encode_shards(train_source(image_root), cache, SPEC, other_weights, num_workers=0, progress=False)


def _datamodule(cache, vae, **kw):
    args = dict(cache_dir=str(cache), vae=vae, resolution=RES, image_size=16, num_classes=1000,
                batch_size=4, num_workers=0, progress=False)
    args.update(kw)
    return LatentImageNetDataModule(**args)


def test_datamodule_batches_follow_the_contract(full_cache, tiny_vae):
    dm = _datamodule(full_cache, tiny_vae)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long and y.shape == (4,)
    assert (dm.num_classes, dm.channels, dm.image_size) == (1000, 4, 16)
    assert (y >= 0).all()  # the unreadable image's row is never served
    images = dm.decode(x)
    assert images.shape == (4, 3, RES, RES) and images.min() >= -1 and images.max() <= 1
    assert dm.val_dataloader() == []


def test_items_are_scaled_means_or_posterior_samples_with_random_flips(full_cache):
    arrays = load_arrays(full_cache)
    valid = np.flatnonzero(arrays["labels"] >= 0)  # item i is row valid[i]
    plain = LatentDataset(full_cache, 0.18215, sample_posterior=False, random_flip=False)
    assert len(plain) == len(IMAGES)
    x, y = plain.__getitems__([3, 1, 9])
    np.testing.assert_allclose(x.numpy(), arrays["mean"][valid[[3, 1, 9]], 0].astype(np.float32) * 0.18215, rtol=1e-6)
    assert y.tolist() == arrays["labels"][valid[[3, 1, 9]]].tolist()
    flipped = LatentDataset(full_cache, 0.18215, sample_posterior=False, random_flip=True)
    torch.manual_seed(0)
    xs, _ = flipped.__getitems__([2] * 400)
    is_flip = torch.isclose(xs, torch.from_numpy(arrays["mean"][valid[2], 1]).float() * 0.18215).flatten(1).all(1)
    is_orig = torch.isclose(xs, torch.from_numpy(arrays["mean"][valid[2], 0]).float() * 0.18215).flatten(1).all(1)
    assert (is_flip ^ is_orig).all() and 150 < int(is_flip.sum()) < 250
    sampled = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=False)
    xs, _ = sampled.__getitems__([5] * 2000)
    mean = torch.from_numpy(arrays["mean"][valid[5], 0]).float() * 0.18215
    std = torch.from_numpy(arrays["std"][valid[5], 0]).float() * 0.18215
    z = (xs.mean(0) - mean) / (std / 2000**0.5)
    assert z.abs().mean() < 1.0 and ((xs.std(0) / std) - 1).abs().mean() < 0.05
    single_x, single_y = sampled[5]
    assert single_x.shape == (4, 16, 16) and single_y.dtype == torch.long
    with pytest.raises(IndexError):
        plain.__getitems__([len(IMAGES)])


def test_dataset_works_under_a_distributed_sampler(full_cache):
    ds = LatentDataset(full_cache, 0.18215)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=False)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_latents, num_workers=1)
        for x, y in loader:
            assert x.shape[1:] == (4, 16, 16) and len(y) == len(x) and (y >= 0).all()
        seen.append(list(sampler))
    assert sorted(seen[0] + seen[1]) == list(range(len(ds)))


def test_val_size_holds_out_a_fixed_subset(full_cache, tiny_vae):
    dm = _datamodule(full_cache, tiny_vae, val_size=3, seed=1)
    dm.setup()
    assert len(dm.train_set) == len(IMAGES) - 3 and len(dm.val_set) == 3
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert sum(len(y) for _, y in dm.val_dataloader()) == 3


def test_encode_cli_fails_in_one_message_without_the_vae(image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main([])
    assert main(["encode", f"data.root={image_root}", f"data.cache_dir={tmp_path / 'c'}", *TINY_CLI,
                 "data.vae.hub_id=no-such-org-for-tests/vae"]) == 1
    err = capsys.readouterr().err
    assert "VAEUnavailableError" in err and "make assets" in err and "Traceback" not in err
    # The file list was taken and the manifest written before the VAE was needed; nothing looks complete.
    assert not is_complete(tmp_path / "c") and (tmp_path / "c" / SHARD_DIR / "manifest.json").is_file()
    assert main(["encode", "data/vae=no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_encode_cli_with_a_local_vae_folder_builds_the_cache(image_root, full_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    build_tiny_autoencoder(levels=2).save_pretrained(tmp_path / "vae")  # same weights as the fixture's
    assert main(["encode", f"data.root={image_root}", f"data.cache_dir={tmp_path / 'c'}",
                 f"data.vae_local_path={tmp_path / 'vae'}", *TINY_CLI]) == 0
    assert is_complete(tmp_path / "c")
    for name, arr in load_arrays(tmp_path / "c").items():
        np.testing.assert_allclose(arr.astype(np.float32), load_arrays(full_cache)[name].astype(np.float32),
                                   rtol=2e-3, atol=1e-4, err_msg=name)
    assert main(["verify", f"data.cache_dir={tmp_path / 'c'}", *TINY_CLI]) == 0


def test_setup_fails_at_once_when_the_vae_for_decode_is_missing(full_cache, tmp_path, monkeypatch):
    cache = copy_cache(full_cache, tmp_path / "cache")
    meta = json.loads((cache / "metadata.json").read_text())
    (cache / "metadata.json").write_text(json.dumps({**meta, "vae": "no-such-vae"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = {"name": "no-such-vae", "hub_id": "no-such-org-for-tests/vae", "subfolder": None, "revision": None,
              "scale": 0.18215, "shift": 0.0, "channels": 4, "downsample": 2}
    with pytest.raises(VAEUnavailableError, match="data.vae_local_path"):
        _datamodule(cache, preset).setup("fit")
    with pytest.raises(VAEUnavailableError, match="no config.json"):
        _datamodule(cache, preset, vae_local_path=str(tmp_path)).setup("fit")


def test_ranks_draw_different_noise_and_the_global_rng_is_left_alone(full_cache):
    torch.manual_seed(7)
    untouched = torch.rand(3)
    draws = {}
    for rank in (0, 1, 0):
        torch.manual_seed(7)  # every rank seeded alike, as seed_everything does
        ds = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=True, rank=rank)
        x, _ = ds.__getitems__([0, 1, 2, 3])
        assert torch.equal(torch.rand(3), untouched)  # reading did not consume the model's RNG
        draws.setdefault(rank, []).append(x)
    assert torch.equal(draws[0][0], draws[0][1]) and not torch.allclose(draws[0][0], draws[1][0])
