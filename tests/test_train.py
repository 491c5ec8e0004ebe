"""train.py end to end (subprocesses, tiny settings): outputs and checkpoint contents, config validation,
a two-job multirun, and the W&B offline fallback."""

from __future__ import annotations

import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, offline_env, run_train
from hydra import compose, initialize_config_dir

from gen_objectives.module import GenerativeModule
from workflow.config import ConfigError, validate_built

CONF = str(ROOT / "conf")
OBJECTIVES = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "objective")) if f.endswith(".yaml"))


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_writes_checkpoint_metrics_and_grid(tmp_path, tiny_args):
    run = tmp_path / "run"
    proc = run_train([*tiny_args, "objective=score", "trainer.max_steps=3", f"hydra.run.dir={run}"])
    assert f"run folder: {run}" in proc.stdout
    assert "_target_: backbones.dit.DiT" in proc.stdout  # the resolved config is printed

    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # plain types only: loadable without unpickling code
    assert ckpt["global_step"] == 3
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert isinstance(cfg, dict) and cfg["objective"]["_target_"].endswith("ScoreObjective")
    assert cfg["run_dir"] == str(run) and cfg["model"]["input_size"] == 8
    net_keys = {k[len("net."):] for k in ckpt["state_dict"] if k.startswith("net.")}
    assert set(ckpt["ema"]) == net_keys

    rows = read_metrics(run / "csv" / "metrics.csv")
    columns = set(rows[0])
    assert "train/loss" in columns and "loss_t/0.0-0.1" in columns and "loss_t/0.9-1.0" in columns
    assert sum(1 for r in rows if r["train/loss"]) == 3

    grid = run / "samples" / "final.png"
    assert grid.is_file() and "sample grid (10 classes x 10 samples" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"sample grid: {grid}")  # the path is the last line printed

    module = GenerativeModule.from_checkpoint(str(ckpt_path))
    for key, value in module.ema.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key])
    out = module.generate(4, torch.arange(4), num_steps=2)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def test_wrong_objective_choice_lists_the_choices(tiny_args):
    proc = run_train([*tiny_args, "objective=nope"], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "objective/nope" in out
    for name in OBJECTIVES:
        assert name in out


def test_bad_objective_key_names_key_and_choices(tiny_args):
    proc = run_train([*tiny_args, "objective=flow", "objective.path=bogus"], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "objective=flow" in out and "path" in out and "linear" in out and "gvp" in out


@pytest.mark.parametrize("override, expected", [
    ("trainer.precision=fp8", ["trainer.precision", "bf16-mixed", "32"]),
    ("callbacks.sample_grid.sampler=rk4", ["callbacks.sample_grid.sampler", "heun", "dopri5"]),
    ("ckpt_path=/no/such.ckpt", ["ckpt_path", "no such file"]),
    ("global_batch_size=100", ["global_batch_size", "not divisible"]),
])
def test_validation_names_key_and_choices(override, expected):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits", "objective=flow", "trainer.devices=8", override])
    from hydra.utils import instantiate
    with pytest.raises(ConfigError) as err:
        validate_built(cfg, instantiate(cfg.objective))
    for text in expected:
        assert text in str(err.value)


def test_multirun_two_jobs_own_folders_and_groups(tmp_path, tiny_args):
    sweep = tmp_path / "sweep"
    run_train(["-m", *tiny_args, "objective=score,flow", "objective.beta_max=10", "trainer.max_steps=2",
               "logger=wandb", f"hydra.sweep.dir={sweep}"])
    jobs = sorted(glob.glob(str(sweep / "*" / "checkpoints" / "last.ckpt")))
    assert len(jobs) == 2, os.listdir(sweep)
    cfgs = [torch.load(j, weights_only=True)["hyper_parameters"]["cfg"] for j in jobs]
    assert {c["objective"]["_target_"].rsplit(".", 1)[1] for c in cfgs} == {"ScoreObjective", "FlowObjective"}
    assert all(c["objective"]["beta_max"] == 10 for c in cfgs)
    assert len({c["run_dir"] for c in cfgs}) == 2
    groups = {c["logger"]["group"] for c in cfgs}
    assert len(groups) == 2 and all("beta_max=10" in g for g in groups)


def test_wandb_without_key_or_network_logs_offline(tmp_path, tiny_args):
    run = tmp_path / "run"
    env = offline_env(WANDB_MODE=None, WANDB_API_KEY=None, HOME=str(tmp_path),
                      WANDB_BASE_URL="http://127.0.0.1:9", WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"))
    proc = run_train([*tiny_args, "logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={run}"], env=env)
    assert "logging OFFLINE" in proc.stdout and "no W&B API key" in proc.stdout
    assert glob.glob(str(run / "wandb" / "offline-run-*")), os.listdir(run)
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_sigterm_writes_last_checkpoint(tmp_path, tiny_args):
    run = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *tiny_args, "trainer.max_steps=100000", "logger=none",
            "callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    try:
        assert last.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "too slow"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "SIGTERM at step" in out, out[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert 2 <= ckpt["global_step"] < 100000


def test_runs_differing_only_in_objective_see_the_same_data(tmp_path, tiny_args):
    """The training order comes from `seed` alone, not from the global RNG the network's init consumes."""
    env = offline_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    seen = {}
    for objective in ("diffusion", "flow"):
        path = tmp_path / f"{objective}.json"
        run_train([*tiny_args, f"objective={objective}", "trainer.max_steps=3", "logger=none",
                   f"+callbacks.rec={{_target_:probes.RecordBatches,path:'{path}'}}",
                   f"hydra.run.dir={tmp_path / objective}"], env=env)
        seen[objective] = json.loads(path.read_text())
    assert len(seen["flow"]) == 3 and seen["diffusion"] == seen["flow"]
