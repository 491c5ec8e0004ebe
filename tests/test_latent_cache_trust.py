"""Issue #13 items 1-7: a latent cache is never reused for other images, never serves wrong rows, names and
repairs damage, records the weights it was encoded with, encodes in fp32, retries failed images, and is never
built inside a training run."""

import inspect
import json
import multiprocessing as mp
import os
import shutil
import socket
import time

import numpy as np
import pytest
import torch
from latent_fixtures import (
    CORRUPT,
    CORRUPT_ROW,
    FILES,
    IMAGES,
    RES,
    SPEC,
    copy_cache,
    load_arrays,
    write_images,
)
from PIL import Image

from datamodules.adm_crop import preprocess
from datamodules.image_sources import ImageFolderSource
from datamodules.latent_cache import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    TooManyFailuresError,
    build_cache,
    is_complete,
    read_metadata,
    shard_path,
)
from datamodules.latent_imagenet import (
    LatentDataset,
    LatentImageNetDataModule,
    compose_data_config,
    launch_env,
    main,
)
from datamodules.vae import DTYPES, VAE, _resolve_dtype, build_tiny_autoencoder, weights_sha256

pytest_plugins = ["latent_fixtures"]  # fixtures image_root, tiny_vae, full_cache

TINY_CLI = ["data.vae.name=tiny-random", "data.vae.hub_id=tiny-org/tiny-random", "data.vae.downsample=2",
            f"data.resolution={RES}", "data.image_size=16", "data.shard_size=4", "data.encode_batch_size=3",
            "data.encode_num_workers=0", "data.progress=false", "data.max_failed_fraction=0.2"]


def _build(source, cache, vae, **kw):
    kw = {"batch_size": 3, "num_workers": 0, "progress": False, "max_failed_fraction": 0.2, **kw}
    return build_cache(source, cache, kw.pop("spec", SPEC), vae, **kw)


# ---- 1. a finished cache is never reused for another split, folder or file list


def test_finished_cache_refuses_another_split_folder_or_file_list(image_root, tiny_vae, full_cache, tmp_path):
    cache = copy_cache(full_cache, tmp_path / "cache")
    shutil.copytree(image_root / "train", image_root.parent / "other_root" / "val", dirs_exist_ok=True)
    shutil.copytree(image_root / "train", image_root / "val", dirs_exist_ok=True)  # same files, other split
    with pytest.raises(CacheMismatchError) as err:
        _build(ImageFolderSource(image_root, "val"), cache, tiny_vae)
    assert "source split: cache was built from 'train', config gives 'val'" in str(err.value)
    with pytest.raises(CacheMismatchError) as err:
        _build(ImageFolderSource(image_root.parent / "other_root", "val"), cache, tiny_vae)
    assert str(image_root / "train") in str(err.value) and str(image_root.parent / "other_root" / "val") in str(err.value)
    extra = tmp_path / "grown"
    shutil.copytree(image_root / "train", extra / "train")
    Image.new("RGB", (40, 40)).save(extra / "train" / "n01" / "new.JPEG")
    cache2 = copy_cache(full_cache, tmp_path / "cache2")
    meta = json.loads((cache2 / "metadata.json").read_text())
    meta["source"]["path"] = os.path.realpath(extra / "train")  # same folder, but an image was added since
    (cache2 / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match=r"another file list .* 11 files.* 12 files"):
        _build(ImageFolderSource(extra, "train"), cache2, tiny_vae)
    # training (no data.root needed) still refuses the other split, and the default cache_dir keeps them apart
    dm = LatentImageNetDataModule(cache_dir=str(full_cache), split="val", vae=tiny_vae, resolution=RES, image_size=16,
                                  num_workers=0)
    with pytest.raises(CacheMismatchError, match="split"):
        dm.setup()
    assert compose_data_config([]).cache_dir != compose_data_config(["data.split=val"]).cache_dir
    assert "_val_" in compose_data_config(["data.split=val"]).cache_dir


# ---- 2. no silent wrong rows: lengths checked at open; verify checks checksums and finiteness


def test_arrays_shorter_than_the_metadata_fail_at_open_naming_the_file(full_cache, tiny_vae, tmp_path):
    cache = copy_cache(full_cache, tmp_path / "cache")
    np.save(cache / "mean.npy", np.load(cache / "mean.npy")[:4])  # 4 rows under metadata saying 11
    with pytest.raises(CacheCorruptError, match=r"mean.npy' has shape \[4, 2, 4, 16, 16\] but metadata.json says \[11"):
        LatentDataset(cache, 0.18215, sample_posterior=False).__getitems__([9])
    dm = LatentImageNetDataModule(cache_dir=str(cache), vae=tiny_vae, resolution=RES, image_size=16, num_workers=0)
    with pytest.raises(CacheCorruptError, match="encode --verify"):
        dm.setup()  # at setup, not in a DataLoader worker at step N


def test_verify_names_the_damaged_shard_and_encode_verify_repairs_it(image_root, full_cache, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_tiny_autoencoder(levels=2).save_pretrained(tmp_path / "vae")
    cache = copy_cache(full_cache, tmp_path / "cache")
    args = [f"data.cache_dir={cache}", *TINY_CLI]
    assert main(["verify", *args]) == 0
    mean = np.load(cache / "mean.npy", mmap_mode="r+")
    mean[5, 0, 1, 2, 3] = np.float16(7.0)  # silent damage inside shard 1 (rows 4..7)
    mean.flush()
    del mean
    assert main(["verify", *args]) == 1
    err = capsys.readouterr().err
    assert "shard 1: rows 4..7 of mean.npy fail their checksum" in err and "--verify" in err
    assert main(["encode", "--verify", f"data.root={image_root}", f"data.vae_local_path={tmp_path / 'vae'}", *args]) == 0
    for name, arr in load_arrays(cache).items():
        np.testing.assert_allclose(arr.astype(np.float32), load_arrays(full_cache)[name].astype(np.float32),
                                   rtol=2e-3, atol=1e-4, err_msg=name)
    assert main(["verify", *args]) == 0


def test_non_finite_latents_are_never_stored(image_root, tiny_vae, tmp_path):
    images = torch.stack([preprocess(image_root / "train" / f, RES) for f in FILES if f != CORRUPT])
    peak = torch.maximum(*[tiny_vae.encode_moments(x)[0].abs().flatten(1).amax(1) for x in (images, images.flip(-1))])
    low, high = peak.sort().values[4:6].tolist()  # largest |z| per image (either flip); k z overflows float16
    model = build_tiny_autoencoder(levels=2)  # (> 65520 rounds to inf) for the 5 largest, the other 5 fit
    with torch.no_grad():
        k = 65520 / (low * high) ** 0.5
        model.quant_conv.weight.mul_(k)
        model.quant_conv.bias.mul_(k)
    meta = _build(ImageFolderSource(image_root, "train"), tmp_path / "c", VAE(model, device="cpu", name="tiny-random"),
                  max_failed_fraction=1.0)
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    overflow = int((peak * k > 65520).sum())
    assert overflow == 5 and meta["num_failed"] == 1 + overflow and meta["count"] == len(IMAGES) - overflow
    assert sum("non-finite latent" in f["error"] for f in report["failed"]) == overflow
    assert np.isfinite(np.load(tmp_path / "c" / "mean.npy")).all() and np.isfinite(meta["channel_std"]).all()


# ---- 3. damaged shards / arrays / metadata: named with the fix, re-encoded on the next run


def test_damaged_shard_marker_is_named_and_reencoded(image_root, tiny_vae, full_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _build(ImageFolderSource(image_root, "train"), cache, tiny_vae,
               on_shard_written=lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    marker = shard_path(cache, 0)
    marker.write_text(marker.read_text()[:40])  # truncated, as a full disk or a kill mid-copy leaves it
    written = []
    _build(ImageFolderSource(image_root, "train"), cache, tiny_vae, on_shard_written=written.append, progress=True)
    assert written == [0, 1, 2]
    assert "shard 0: shard_000000.json is damaged (JSONDecodeError); re-encoding it" in capsys.readouterr().out
    for name, arr in load_arrays(cache).items():
        assert np.array_equal(arr, load_arrays(full_cache)[name]), name


def test_truncated_array_and_damaged_metadata_are_named_with_the_fix(image_root, tiny_vae, full_cache, tmp_path):
    cache = copy_cache(full_cache, tmp_path / "cache")
    size = (cache / "std.npy").stat().st_size
    with open(cache / "std.npy", "r+b") as f:
        f.truncate(size - 3 * 4096)  # the last shard's rows cut off
    with pytest.raises(CacheCorruptError, match=r"std.npy' cannot be read .* truncated or damaged\. Fix: .*--verify"):
        LatentDataset(cache, 0.18215).__getitems__([0])
    written = []
    _build(ImageFolderSource(image_root, "train"), cache, tiny_vae, verify=True, on_shard_written=written.append)
    assert written == [2]  # only the shard past the cut is re-encoded
    for name, arr in load_arrays(cache).items():
        assert np.array_equal(arr, load_arrays(full_cache)[name]), name
    meta_text = (cache / "metadata.json").read_text()
    (cache / "metadata.json").write_text(meta_text[: len(meta_text) // 2])
    with pytest.raises(CacheCorruptError, match=r"metadata.json' is damaged \(not JSON.*delete it and rerun"):
        read_metadata(cache)
    (cache / "metadata.json").unlink()  # the fix the message gives: only the metadata is rebuilt
    written.clear()
    _build(ImageFolderSource(image_root, "train"), cache, tiny_vae, on_shard_written=written.append)
    assert written == [] and json.loads((cache / "metadata.json").read_text()) == json.loads(meta_text)


def test_encoding_writes_into_the_final_arrays(image_root, tiny_vae, tmp_path):
    cache = tmp_path / "cache"
    seen = []

    def look(shard):
        seen.append(sorted(p.name for p in cache.iterdir()))
        assert np.load(cache / "mean.npy", mmap_mode="r").shape == (len(FILES), 2, 4, 16, 16)

    _build(ImageFolderSource(image_root, "train"), cache, tiny_vae, on_shard_written=look)
    assert seen[0] == ["files.tsv", "mean.npy", "shards", "std.npy"]  # no per-shard latent copies to merge
    assert sum(p.stat().st_size for p in (cache / "shards").iterdir()) < 20_000  # markers only


# ---- 4. the metadata records the weights that were loaded


def test_metadata_records_hub_revision_or_local_path_and_the_weights_hash(image_root, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_autoencoder(levels=2, seed=3)
    model.save_pretrained(tmp_path / "local_vae")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-random"  # a Hugging Face cache holding one snapshot
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    root = [f"data.root={image_root}", *TINY_CLI]
    assert main(["encode", f"data.cache_dir={tmp_path / 'a'}", f"data.vae_local_path={tmp_path / 'local_vae'}", *root]) == 0
    assert main(["encode", f"data.cache_dir={tmp_path / 'b'}", *root]) == 0
    local, hub = read_metadata(tmp_path / "a")["vae_weights"], read_metadata(tmp_path / "b")["vae_weights"]
    assert local == {"source": "local", "local_path": str((tmp_path / "local_vae").resolve()),
                     "sha256": weights_sha256(model)}
    assert hub == {"source": "hub", "hub_id": "tiny-org/tiny-random", "subfolder": None, "revision": commit,
                   "sha256": weights_sha256(model)}
    assert weights_sha256(build_tiny_autoencoder(levels=2, seed=4)) != weights_sha256(model)


def test_decoding_with_other_weights_than_the_encoders_fails(full_cache):
    other = VAE(build_tiny_autoencoder(levels=2, seed=9), device="cpu", name="tiny-random")
    dm = LatentImageNetDataModule(cache_dir=str(full_cache), vae=other, resolution=RES, image_size=16, num_workers=0)
    with pytest.raises(CacheMismatchError, match="is not the one that encoded"):
        dm.decode(torch.zeros(1, 4, 16, 16))


# ---- 5. fp32 encode by default


def test_encode_precision_defaults_to_fp32_on_every_device():
    cfg = compose_data_config([])
    assert cfg.vae_dtype == "float32" and _resolve_dtype(cfg.vae_dtype) == torch.float32
    assert inspect.signature(LatentImageNetDataModule).parameters["vae_dtype"].default == "float32"
    assert VAE(build_tiny_autoencoder(), device="cpu").dtype == torch.float32
    assert set(DTYPES) == {"float32", "tf32", "bfloat16", "float16"}
    with pytest.raises(ValueError, match="data.vae_dtype='auto' is not one of"):
        _resolve_dtype("auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_encode_on_gpu_turns_tf32_off_and_matches_cpu():
    model = build_tiny_autoencoder(levels=2)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    cpu = VAE(model, device="cpu").encode_moments(images)[0]
    torch.backends.cudnn.allow_tf32 = True
    gpu = VAE(build_tiny_autoencoder(levels=2), device="cuda")
    seen = []
    gpu.model.encoder.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.allow_tf32))
    mean = gpu.encode_moments(images.cuda())[0].cpu()
    assert seen == [False] and torch.backends.cudnn.allow_tf32  # off during the encode, restored after
    torch.testing.assert_close(mean, cpu, rtol=1e-4, atol=1e-5)


# ---- 6. failed images: a threshold with a report, and --retry-failed


def test_too_many_failures_stop_the_encode_and_retry_failed_rereads_them(tiny_vae, full_cache, tmp_path, capsys):
    root = tmp_path / "imagenet"
    write_images(root / "train")
    cache = tmp_path / "cache"
    with pytest.raises(TooManyFailuresError) as err:  # 1 of 11 unreadable is above 5%
        _build(ImageFolderSource(root, "train"), cache, tiny_vae, max_failed_fraction=0.05)
    assert CORRUPT in str(err.value) and "data.max_failed_fraction=0.05" in str(err.value)
    assert "--retry-failed" in str(err.value) and not is_complete(cache)
    assert json.loads((cache / "report.json").read_text())["failed"][0]["path"] == CORRUPT
    shutil.copy(root / "train" / "n02" / "e.JPEG", root / "train" / CORRUPT)  # the file is repaired
    written = []
    meta = _build(ImageFolderSource(root, "train"), cache, tiny_vae, retry_failed=True, max_failed_fraction=0.05,
                  on_shard_written=written.append)
    assert written == [CORRUPT_ROW // 4] and meta["num_failed"] == 0 and meta["count"] == len(FILES)
    arrays, ref = load_arrays(cache), load_arrays(full_cache)
    mean, _ = tiny_vae.encode_moments(preprocess(root / "train" / CORRUPT, RES)[None])
    np.testing.assert_allclose(arrays["mean"][CORRUPT_ROW, 0], mean[0].numpy(), rtol=2e-3, atol=2e-3)
    others = [i for i in range(len(FILES)) if i != CORRUPT_ROW]
    assert np.array_equal(arrays["mean"][others], ref["mean"][others])
    assert arrays["labels"][CORRUPT_ROW] == 1


def test_retry_failed_on_a_finished_cache(image_root, tiny_vae, full_cache, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(image_root / "train", root / "train")
    cache = tmp_path / "cache"
    _build(ImageFolderSource(root, "train"), cache, tiny_vae)  # finished with one skipped image
    assert read_metadata(cache)["num_failed"] == 1
    shutil.copy(root / "train" / "n02" / "e.JPEG", root / "train" / CORRUPT)
    written = []
    meta = _build(ImageFolderSource(root, "train"), cache, tiny_vae, retry_failed=True, on_shard_written=written.append)
    assert written == [CORRUPT_ROW // 4] and meta["num_failed"] == 0
    assert len(LatentDataset(cache, 0.18215)) == len(FILES)


# ---- 7. training never encodes; make latents runs under torchrun and srun


def test_prepare_data_fails_at_once_pointing_at_make_latents(image_root, tiny_vae, tmp_path):
    dm = LatentImageNetDataModule(root=str(image_root), cache_dir=str(tmp_path / "missing"), split="train",
                                  vae=tiny_vae, resolution=RES, image_size=16, num_workers=0)
    start = time.perf_counter()
    with pytest.raises(CacheIncompleteError) as err:
        dm.prepare_data()
    assert time.perf_counter() - start < 1.0 and not (tmp_path / "missing").exists()  # nothing was encoded
    msg = str(err.value)
    assert f'make latents ARGS="data.root={image_root} data.cache_dir={tmp_path / "missing"}"' in msg
    assert "torchrun" in msg and "srun" in msg and "never encodes" in msg


def test_launch_env_reads_torchrun_and_srun_but_not_a_bare_sbatch_script(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # an sbatch script's own environment, no srun step
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launch_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[017-020]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242123")
    assert launch_env() == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu017" and os.environ["MASTER_PORT"] == str(15000 + 2123)
    monkeypatch.setenv("RANK", "3")  # torchrun wins when both are present
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert launch_env() == (3, 4, 2)


def _srun_task(rank, args, job_id, log_dir):
    """One srun task: only SLURM's variables say who it is."""
    import datamodules.latent_cache as lc

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                      SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID=str(job_id), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    encode = lc.encode_shards

    def logged(*a, **kw):
        written = encode(*a, **kw)
        (log_dir / f"rank{kw['rank']}of{kw['world_size']}.json").write_text(json.dumps(written))
        return written

    lc.encode_shards = logged
    os._exit(main(["encode", *args]))


def _free_port_in_slurm_range() -> int:
    for port in np.random.default_rng().permutation(np.arange(15000, 25000)).tolist():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_encode_under_srun_shards_by_slurm_rank(image_root, full_cache, tmp_path):
    build_tiny_autoencoder(levels=2).save_pretrained(tmp_path / "vae")
    args = [f"data.root={image_root}", f"data.cache_dir={tmp_path / 'c'}", f"data.vae_local_path={tmp_path / 'vae'}",
            *TINY_CLI]
    job_id = 1000000 + _free_port_in_slurm_range() - 15000  # Lightning's rule: port 15000 + last 4 digits
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_srun_task, args=(r, args, job_id, tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert [json.loads((tmp_path / f"rank{r}of2.json").read_text()) for r in range(2)] == [[0, 2], [1]]
    for name, arr in load_arrays(tmp_path / "c").items():
        np.testing.assert_allclose(arr.astype(np.float32), load_arrays(full_cache)[name].astype(np.float32),
                                   rtol=2e-3, atol=1e-4, err_msg=name)
