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
from omegaconf import OmegaConf

import evaluate
from callbacks.fid import FIDCallback
from evaluation.features import DigitsFeatures

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
    [m] = read_records(e2e)
    assert m["num_samples"] == 30 and m["world_size"] == 1 and m["samples_generated"] == 30
    assert np.isfinite(m["digits_fid_30"]) and m["digits_fid_30"] > 0
    assert 0.0 <= m["digits_class_accuracy"] <= 1.0
    assert 0.0 <= m["digits_precision"] <= 1.0 and 0.0 <= m["digits_recall"] <= 1.0
    assert np.isfinite(m["digits_kid"]) and m["digits_kid_stderr"] > 0 and m["digits_fid_30_bootstrap_std"] > 0
    assert "NOT comparable with Inception" in m["extractors"][0]["note"]
    assert (m["sampler"], m["num_steps"], m["cfg_scale"], m["nfe"]) == ("euler", 2, 1.0, 2.0)
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
    [first] = read_records(e2e)
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
    with pytest.raises(ValueError, match="holds samples of another sample set"):
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
    [one] = read_records(e2e)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
           ckpt, *SMALL, f"out_dir={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env_with_cache(cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [two] = read_records(tmp_path / "two")
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
                     extractor={**cb_cfg.extractor, "digits_epochs": 2}, records=str(tmp_path / "fid.jsonl"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    m = cb.last_metrics
    assert m["num_samples"] == 20 and np.isfinite(m["digits_fid_20"]) and 0 <= m["digits_class_accuracy"] <= 1
    assert (m["sampler"], m["num_steps"]) == ("euler", 2)
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "fid/digits_fid_20" in logged and "fid/digits_class_accuracy" in logged and "fid/digits_kid" in logged
    [record] = read_records_file(tmp_path / "fid.jsonl")
    assert record["ckpt_step"] == 2 and record["digits_fid_20"] == m["digits_fid_20"]
    assert torch.is_grad_enabled()


# ---- issue #12 items 1-7: bookkeeping that produced wrong numbers without a word ----------------------------
def read_records_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_records(out_dir: Path) -> list[dict]:
    return read_records_file(out_dir / "metrics.jsonl")


def overwrite_with_other_weights(ckpt: Path, steps_more: int = 2) -> None:
    """What a longer training run does to last.ckpt: other EMA weights and a later step at the same path."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(123)
    for key, value in state["ema"].items():
        if value.is_floating_point():
            state["ema"][key] = value + 0.2 * torch.randn(value.shape, generator=gen)
    state["global_step"] = int(state["global_step"]) + steps_more
    torch.save(state, ckpt)


def test_item1_overwritten_checkpoint_never_reuses_old_samples(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_ckpt, ckpt)
    first = evaluate.run(eval_cfg(f"ckpt={ckpt}", *SMALL))
    overwrite_with_other_weights(ckpt)
    second = evaluate.run(eval_cfg(f"ckpt={ckpt}", *SMALL))  # the README's command again, same path
    assert second["samples_generated"] == 30, "resumed the samples of the checkpoint that was overwritten"
    assert second["digits_fid_30"] != first["digits_fid_30"]
    assert second["ckpt_step"] == first["ckpt_step"] + 2
    assert second["ckpt_fingerprint"] != first["ckpt_fingerprint"]
    # a folder that holds another checkpoint's samples is refused, naming both
    with pytest.raises(ValueError, match="fingerprint"):
        evaluate.run(eval_cfg(f"ckpt={ckpt}", *SMALL, f"out_dir={first['out_dir']}"))


class ClassSortedDigits(torch.nn.Module):
    """A real datamodule whose training set is sorted by class, like the latent cache (class folders in order)."""

    num_classes, channels, image_size = 10, 1, 8

    def __init__(self):
        super().__init__()
        from datamodules.digits import load_digits_tensors

        x, y = load_digits_tensors(8)
        order = torch.argsort(y, stable=True)
        self.x, self.y = x[order], y[order]

    def setup(self, stage=None):
        pass

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=64)

    def decode(self, x):
        return x.clamp(-1, 1)


def test_item2_capped_reference_is_a_seeded_subset_over_all_classes(cache, tmp_path):
    from evaluation.features import DigitsFeatures
    from evaluation.reference import get_reference
    from evaluation.stats import quantize

    dm = ClassSortedDigits()
    ext = DigitsFeatures(image_size=8, epochs=2)
    path = tmp_path / "ref.npz"
    get_reference(str(path), ext, dm, torch.device("cpu"), True, 400, 128)
    with torch.no_grad():
        feats = ext(quantize(dm.x))["pool"].double().numpy()
    mu_ref, mu_all, mu_first = np.load(path)["mu"], feats.mean(0), feats[:400].mean(0)
    # the first 400 class-sorted images are digits 0, 1 and 2 only: far from the whole set's mean
    assert np.linalg.norm(mu_ref - mu_all) < 0.5 * np.linalg.norm(mu_first - mu_all)


def test_item3_reference_files_are_keyed_by_cap_and_recorded(tiny_ckpt, tmp_path):
    capped = evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL, f"out_dir={tmp_path / 'a'}", "ref_max_images=300"))
    whole = evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL, f"out_dir={tmp_path / 'b'}"))
    assert int(np.load(capped["ref_stats"])["count"]) == 300
    assert int(np.load(whole["ref_stats"])["count"]) == 1617, "the whole split shared the capped file"
    assert capped["ref_stats"] != whole["ref_stats"]
    ident = whole["reference"]
    assert ident["count"] == 1617 and ident["cap"] is None and ident["split"] == "train"
    assert capped["reference"]["cap"] == 300 and capped["reference"]["subset_seed"] == 0
    assert ident["extractor"] == capped["reference"]["extractor"] and ident["source"].startswith("data:")


def test_item4_metrics_are_appended_one_record_per_evaluation(tiny_ckpt, tmp_path):
    out = tmp_path / "eval"
    evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL, f"out_dir={out}"))
    evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL[1:], "num_samples=20", f"out_dir={out}"))
    records = read_records(out)
    assert [r["num_samples"] for r in records] == [30, 20]
    for r in records:
        for key in ("extractors", "reference", "sampler", "nfe", "cfg_scale", "seed", "num_samples", "ckpt_step",
                    "ckpt_fingerprint", "labels", "matmul_precision", "time"):
            assert key in r, key
    assert "digits_fid_30" in records[0] and "digits_fid_20" in records[1]


def test_item5_wrong_reference_shape_fails_before_sampling(tiny_ckpt, tmp_path):
    ext = DigitsFeatures(image_size=8, epochs=2)  # the extractor evaluate.py builds (same settings, cached)
    bad = tmp_path / "bad_ref.npz"
    np.savez(bad, mu=np.zeros(10), sigma=np.eye(10), count=np.int64(100), extractor=np.array(ext.name))
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match="64"):
        evaluate.run(eval_cfg(f"ckpt={tiny_ckpt}", *SMALL, f"out_dir={out}", f"ref_stats={bad}"))
    assert not list(out.glob("chunks/*.npz")), "sampled before finding that the reference cannot be used"


@pytest.mark.parametrize("kind", ["random_bytes", "state_dict"])
def test_item5_a_file_that_is_not_a_checkpoint_fails_with_one_line(tmp_path, kind):
    path = tmp_path / "model.ckpt"
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
    else:
        torch.save({"weight": torch.zeros(3), "bias": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by train.py") as err:
        evaluate.run(eval_cfg(f"ckpt={path}", *SMALL))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_item5_the_command_line_prints_one_line_and_exits_2(tmp_path, cache):
    bad = tmp_path / "step=0000001.ckpt"
    bad.write_bytes(os.urandom(2048))
    res = subprocess.run([PY, "evaluate.py", f"ckpt='{bad}'", f"hydra.run.dir={tmp_path / 'h'}"], cwd=ROOT,
                         env={**env_with_cache(cache), "HYDRA_FULL_ERROR": "0"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a checkpoint written by train.py" in lines[0]


def _item6_worker(rank, world, port, tmp):
    """Node-local caches: the reference file exists on rank 0's disk only."""
    import datetime

    import torch.distributed as dist

    from datamodules.digits import DigitsDataModule
    from evaluation.reference import get_reference

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        ext = DigitsFeatures(image_size=8, epochs=2, cache_dir=tmp, verbose=False)
        path = Path(tmp) / f"node{rank}" / "ref.npz"
        ref = get_reference(str(path), ext, DigitsDataModule(image_size=8), torch.device("cpu"), True, 200, 256)
        # no file on any node: rank 0 decides to compute, every rank takes a share, rank 0 writes, all agree
        fresh = get_reference(str(Path(tmp) / f"node{rank}" / "fresh.npz"), ext, DigitsDataModule(image_size=8),
                              torch.device("cpu"), True, None, 256, rows=300)
        torch.save({"count": int(np.load(Path(tmp) / "node0" / "ref.npz")["count"]), "mu": ref.stats["pool"][0],
                    "fresh": fresh}, Path(tmp) / f"out{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_item6_rank0_decides_about_the_reference_and_broadcasts(cache, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from datamodules.digits import DigitsDataModule
    from evaluation.reference import get_reference

    torch.set_num_threads(1)
    ext = DigitsFeatures(image_size=8, epochs=2, cache_dir=str(tmp_path), verbose=False)
    get_reference(str(tmp_path / "node0" / "ref.npz"), ext, DigitsDataModule(image_size=8), torch.device("cpu"),
                  True, 200, 256)  # on node 0's disk only
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_item6_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"out{r}.pt", weights_only=False) for r in range(2))
    np.testing.assert_array_equal(r0["mu"], r1["mu"])
    assert not (tmp_path / "node1" / "ref.npz").exists()  # only rank 0 reads or writes the reference
    single = get_reference(None, ext, DigitsDataModule(image_size=8), torch.device("cpu"), True, None, 256, rows=300)
    for r in (r0, r1):
        np.testing.assert_allclose(r["fresh"].stats["pool"][1], single.stats["pool"][1], rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(r["fresh"].rows, single.rows)  # the same images' rows, in the same order
    assert (tmp_path / "node0" / "fresh.npz").is_file() and not (tmp_path / "node1" / "fresh.npz").exists()


def test_item7_callback_and_evaluate_use_one_precision_whatever_the_caller_set(tmp_path, cache):
    """The same checkpoint and settings give the same numbers in the training callback and in evaluate.py,
    although the training process lowered the fp32 matmul precision (TF32 on GPUs; bf16 on this CPU)."""
    import lightning as L

    from gen_objectives.module import GenerativeModule

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=digits", "data.batch_size=16", "model.depth=1"])
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "objective")}
    dm = instantiate(cfg.data)
    torch.manual_seed(0)
    module = GenerativeModule(instantiate(cfg.model), instantiate(cfg.objective), sample_shape=(1, 8, 8),
                              ema={"decay": 0.5}, cfg=plain)
    cb = FIDCallback(num_samples=20, batch_size=10, sampler="euler", num_steps=2, progress=False,
                     extractor=DigitsFeatures(image_size=8, epochs=2))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[cb], enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # what a training script may set for speed
    try:
        trainer.fit(module, datamodule=dm)
        ckpt = tmp_path / "cb.ckpt"
        trainer.save_checkpoint(ckpt)
        assert torch.get_float32_matmul_precision() == "medium"  # restored after the callback
        m = evaluate.run(eval_cfg(f"ckpt={ckpt}", *SMALL, "num_samples=20", f"out_dir={tmp_path / 'e'}"))
    finally:
        torch.set_float32_matmul_precision(before)
    assert cb.last_metrics["digits_fid_20"] == pytest.approx(m["digits_fid_20"], rel=1e-9, abs=1e-9)


def test_published_weights_evaluate_through_a_preset(tmp_path, cache):
    """#14 item 1: a SiT training file (not a project checkpoint) loads into the configured network in SiT's time
    convention and is evaluated; its weights' fingerprint keys the samples, the step is unknown."""
    from checkpoint_files import random_dit, write_sit_training

    src = random_dit(seed=5, input_size=8, in_channels=1, num_classes=10, depth=1)
    path = write_sit_training(src, tmp_path / "SiT.pt")
    out = tmp_path / "eval"
    record = evaluate.run(eval_cfg(f"ckpt={path}", "experiment=published_sit_xl", "data=digits", "~data.vae_dtype",
                                   "data.image_size=8", "model=dit_tiny", *[f"model.{k}={v}" for k, v in
                                   dict(hidden_size=src.hidden_size, depth=1, num_heads=src.num_heads,
                                        learn_sigma=True).items()],
                                   "cfg_scale=1.0", *SMALL, f"out_dir={out}", "precision_recall=false", "kid=false",
                                   "fid_bootstrap=0"))
    assert record["ckpt_step"] is None and len(record["ckpt_fingerprint"]) == 16
    assert record["digits_fid_30"] > 0 and (out / "metrics.jsonl").is_file()
    # the weights really came from the file: another file gives another fingerprint
    other = write_sit_training(random_dit(seed=6, input_size=8, in_channels=1, num_classes=10, depth=1),
                               tmp_path / "SiT2.pt")
    from evaluation.checkpoint import load_eval_model

    cfg = eval_cfg(f"ckpt={other}", "experiment=published_sit_xl", "data=digits", "~data.vae_dtype",
                   "data.image_size=8", "model=dit_tiny", f"model.hidden_size={src.hidden_size}", "model.depth=1",
                   f"model.num_heads={src.num_heads}", "model.learn_sigma=true")
    assert load_eval_model(other, weights_cfg=cfg).fingerprint != record["ckpt_fingerprint"]
