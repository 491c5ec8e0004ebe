"""evaluate.py end to end on a tiny digits checkpoint made by train.py, resume, DDP (gloo), and the FID
callback inside a real Trainer. Features come from the small digits CNN (no Inception download)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import evaluate
from callbacks.features import DigitsFeatures
from callbacks.fid import FIDCallback

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMALL = ["num_samples=30", "batch_size=10", "sampler=euler", "num_steps=2", "extractor.digits_epochs=2",
         "feature_batch_size=16", "progress=false"]


def env_with_cache(cache: Path) -> dict:
    return {**os.environ, "D2F_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["D2F_CACHE_DIR"] = str(path)  # in-process runs share the classifier/ref-stats cache
    yield path
    os.environ.pop("D2F_CACHE_DIR", None)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, cache):
    """Two optimizer steps of the digits experiment through train.py itself, on the CPU."""
    run_dir = tmp_path_factory.mktemp("run")
    cmd = [PY, "train.py", "experiment=digits", "trainer=cpu", "trainer.max_steps=2", "data.batch_size=16",
           "trainer.limit_val_batches=0", "trainer.val_check_interval=null", "logger=none",
           "callbacks.rich_progress_bar=null", "callbacks.sample_grid=null",
           "callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env_with_cache(cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def eval_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def e2e(tiny_ckpt, cache, tmp_path_factory):
    """One `python evaluate.py ...` run (the Hydra entry point), shared by the checks below."""
    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "eval"
    named = tmp / "step=0000002.ckpt"  # Lightning's checkpoint names contain '='; quoted as the Makefile does
    shutil.copy(tiny_ckpt, named)
    cmd = [PY, "evaluate.py", f"ckpt='{named}'", *SMALL, "save_npz=true", f"out_dir={out}",
           f"hydra.run.dir={tmp / 'hydra'}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env_with_cache(cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, f"ckpt='{named}'"


def test_evaluate_end_to_end(e2e):
    e2e, _ = e2e
    m = json.loads((e2e / "metrics.json").read_text())
    assert m["num_samples"] == 30 and m["world_size"] == 1 and m["samples_generated"] == 30
    assert np.isfinite(m["digits_fid_30"]) and m["digits_fid_30"] > 0
    assert 0.0 <= m["digits_class_accuracy"] <= 1.0
    assert "NOT comparable with Inception FID" in m["note"]
    assert (m["sampler"], m["num_steps"], m["cfg_scale"]) == ("euler", 2, 1.0)
    assert (e2e / "samples_grid.png").is_file()
    with np.load(e2e / "samples_30.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (30, 8, 8, 3) and arr.dtype == np.uint8
    with np.load(e2e / "chunks" / "chunk_000001.npz") as f:
        assert np.array_equal(arr[10:20], np.repeat(f["images"], 3, axis=-1))  # ADM npz keeps sample order
    assert Path(m["ref_stats"]).is_file()  # reference stats computed once and cached


def test_resume_regenerates_only_missing_chunks(e2e, tmp_path):
    e2e, ckpt = e2e
    out = tmp_path / "eval"
    shutil.copytree(e2e, out)
    first = json.loads((e2e / "metrics.json").read_text())
    chunks = sorted((out / "chunks").glob("chunk_*.npz"))
    assert len(chunks) == 3
    originals = [np.load(c)["images"] for c in chunks]
    kept_mtime = chunks[0].stat().st_mtime_ns
    # an interrupted run: chunk 1 never written, chunk 2 half-written, a stray temporary file
    chunks[1].unlink()
    chunks[2].write_bytes(chunks[2].read_bytes()[:100])
    (out / "chunks" / "chunk_000001.npz.tmp123").write_bytes(b"partial")
    second = evaluate.run(eval_cfg(ckpt, *SMALL, f"out_dir={out}"))
    assert second["samples_generated"] == 20
    assert chunks[0].stat().st_mtime_ns == kept_mtime
    for c, orig in zip(chunks, originals):
        assert np.array_equal(np.load(c)["images"], orig)  # the same samples, regenerated from (seed, index)
    assert second["digits_fid_30"] == pytest.approx(first["digits_fid_30"], rel=1e-6)  # 1 vs 2 CPU threads
    # a larger run reuses every complete chunk; a different seed in the same folder is refused
    third = evaluate.run(eval_cfg(ckpt, *SMALL[1:], "num_samples=35", f"out_dir={out}"))
    assert third["samples_generated"] == 5 and "digits_fid_35" in third
    with pytest.raises(ValueError, match="holds samples made with"):
        evaluate.run(eval_cfg(ckpt, *SMALL, "seed=1", f"out_dir={out}"))


def test_missing_inception_weights_fail_before_sampling(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(FileNotFoundError, match="make assets"):
        evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL, f"out_dir={out}", "extractor.name=inception",
                              "extractor.download=false", f"extractor.cache_dir={tmp_path}"))
    assert not list((out / "chunks").glob("*.npz"))  # nothing was sampled
    with pytest.raises(FileNotFoundError, match="make eval CKPT="):
        evaluate.run(eval_cfg(f"ckpt={tmp_path / 'missing.ckpt'}", *SMALL))


@pytest.mark.slow
def test_two_gloo_ranks_generate_disjoint_shares_with_the_same_result(cache, e2e, tmp_path):
    e2e, ckpt = e2e
    one = json.loads((e2e / "metrics.json").read_text())
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
           ckpt, *SMALL, f"out_dir={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env_with_cache(cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["num_samples"] == 30 and two["samples_generated"] == 30
    for c in range(3):  # rank c % 2 wrote chunk c; the samples are the single process's samples
        a = np.load(e2e / "chunks" / f"chunk_{c:06d}.npz")
        b = np.load(tmp_path / "two" / "chunks" / f"chunk_{c:06d}.npz")
        assert np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1  # thread-count rounding
    assert two["digits_fid_30"] == pytest.approx(one["digits_fid_30"], rel=1e-3)


def test_fid_callback_in_a_real_trainer(tmp_path, cache):
    """Two training steps, then the callback samples with EMA weights and logs digits-FID and accuracy."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from gen_objectives.module import GenerativeModule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=digits", "data.batch_size=16",
                                          "+callbacks@callbacks.digits_fid=digits_fid"])
    dm = instantiate(cfg.data)
    module = GenerativeModule(instantiate(cfg.model), instantiate(cfg.objective), sample_shape=(1, 8, 8))
    cb_cfg = cfg.callbacks.digits_fid
    cb = FIDCallback(num_samples=20, batch_size=10, sampler="euler", num_steps=2, progress=False,
                     extractor=DigitsFeatures(image_size=cb_cfg.extractor.image_size, epochs=2))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    m = cb.last_metrics
    assert m["num_samples"] == 20 and np.isfinite(m["digits_fid_20"]) and 0 <= m["digits_class_accuracy"] <= 1
    assert (m["sampler"], m["num_steps"]) == ("euler", 2)
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "fid/digits_fid_20" in logged and "fid/digits_class_accuracy" in logged
    assert torch.is_grad_enabled()
