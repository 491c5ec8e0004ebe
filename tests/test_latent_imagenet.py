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
from workflow.data_order import EpochItem

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
    xs, _ = flipped.__getitems__([EpochItem(e, 2) for e in range(400)])  # item 2 in 400 passes
    is_flip = torch.isclose(xs, torch.from_numpy(arrays["mean"][valid[2], 1]).float() * 0.18215).flatten(1).all(1)
    is_orig = torch.isclose(xs, torch.from_numpy(arrays["mean"][valid[2], 0]).float() * 0.18215).flatten(1).all(1)
    assert (is_flip ^ is_orig).all() and 150 < int(is_flip.sum()) < 250
    sampled = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=False)
    xs, _ = sampled.__getitems__([EpochItem(e, 5) for e in range(2000)])
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


def test_noise_and_flips_are_a_function_of_seed_pass_and_item_and_leave_the_global_rng_alone(full_cache):
    """Two reads of the same (pass, item) are equal whatever was read before; another pass, item or seed differs."""
    torch.manual_seed(7)
    untouched = torch.rand(3)
    torch.manual_seed(7)
    ds = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=True, seed=3)
    x, _ = ds.__getitems__([EpochItem(1, i) for i in (0, 1, 2, 3)])
    assert torch.equal(torch.rand(3), untouched)  # reading did not consume the model's RNG
    fresh = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=True, seed=3)
    fresh.__getitems__([EpochItem(0, 5), EpochItem(1, 1)])  # other reads first: no stream position to depend on
    again, _ = fresh.__getitems__([EpochItem(1, 3), EpochItem(1, 1)])
    assert torch.equal(again, x[[3, 1]])
    assert torch.equal(fresh[EpochItem(1, 2)][0], x[2])
    other_pass, _ = ds.__getitems__([EpochItem(2, i) for i in (0, 1, 2, 3)])
    other_seed, _ = LatentDataset(full_cache, 0.18215, seed=4).__getitems__([EpochItem(1, i) for i in (0, 1, 2, 3)])
    for a, b in ((x, other_pass), (x, other_seed), (x[:1], x[1:2])):
        assert not torch.isclose(a, b).any(dim=-1).all()


def test_reference_items_are_the_unflipped_posterior_means(full_cache):
    arrays = load_arrays(full_cache)
    valid = np.flatnonzero(arrays["labels"] >= 0)
    ds = LatentDataset(full_cache, 0.18215, sample_posterior=True, random_flip=True, seed=3)
    x, y = ds.reference_items([4, 0, 7])
    np.testing.assert_array_equal(x.numpy(), arrays["mean"][valid[[4, 0, 7]], 0].astype(np.float32) * np.float32(0.18215))
    assert y.tolist() == arrays["labels"][valid[[4, 0, 7]]].tolist()


def _stream(loader):
    """Batches pass after pass, as Lightning's epochs read them."""
    while True:
        yield from loader


def _take(stream, count):
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_loader_reads_bit_identical_batches(full_cache, tiny_vae, num_workers):
    """Saved in the middle of pass 1 and restored in a new loader: the same next batches (noise and flips too),
    whatever num_workers; and the same batches as a loader without workers."""
    def loader(workers):
        dm = _datamodule(full_cache, tiny_vae, batch_size=2, num_workers=workers, shuffle_seed=5)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader(num_workers)
    batches = _stream(first)
    before = _take(batches, 5 + 2)  # pass 0 (5 batches of 2) and 2 batches of pass 1
    state = first.state_dict()
    assert state["epoch"] == 1 and state["consumed"] == 4
    after = _take(batches, 5)  # the rest of pass 1 and 2 batches of pass 2
    resumed = loader(num_workers)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(after, _take(_stream(resumed), 5), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    for (x, _), (x2, _) in zip(before + after, _take(_stream(loader(0)), 12), strict=True):
        assert torch.equal(x, x2)


class PixelFeatures(torch.nn.Module):
    """A fixed random projection of the decoded pixels: a small real extractor for reference statistics."""

    name, dims = "pixel-projection-test", {"pool": 5}

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * RES * RES, 5)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return {"pool": self.proj((images.float() / 255).flatten(1))}


def test_a_reference_computed_from_the_latent_cache_is_bit_reproducible(full_cache, tiny_vae):
    """evaluation/ reads the unflipped posterior means: two runs (other global seeds) give the same statistics."""
    from evaluation.reference import compute_reference, data_source, reference_identity
    from evaluation.stats import quantize

    ext = PixelFeatures()
    identity = reference_identity("data:test", ext.name, None, 0, rows=4)
    refs = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # another run
        dm = _datamodule(full_cache, tiny_vae, sample_posterior=True, random_flip=True)
        refs.append(compute_reference(identity, ext, dm, torch.device("cpu"), batch_size=4, progress=False))
    for key in ("pool",):
        for a, b in zip(refs[0].stats[key], refs[1].stats[key], strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(refs[0].rows, refs[1].rows)
    x, _ = dm.train_set.reference_items(list(range(len(IMAGES))))
    with torch.no_grad():
        feats = ext(quantize(dm.decode(x)))["pool"].double().numpy()
    np.testing.assert_allclose(refs[0].stats["pool"][0], feats.mean(0), rtol=1e-6, atol=1e-9)
    # the training reads' randomness is not part of a reference's identity
    data = {"_target_": "datamodules.latent_imagenet.LatentImageNetDataModule", "cache_dir": "c"}
    assert data_source({**data, "sample_posterior": True, "random_flip": True}) == data_source(
        {**data, "sample_posterior": False, "random_flip": False}) != data_source({**data, "cache_dir": "d"})
