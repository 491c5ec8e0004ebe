"""train.py end to end (subprocesses, tiny settings): outputs and checkpoint contents, config validation,
a two-job multirun, and the W&B offline fallback."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, offline_env, run_train
from hydra import compose, initialize_config_dir
from probes import wandb_records

from gen_objectives.module import GenerativeModule
from workflow.build import build_objective, build_run
from workflow.config import ConfigError, check_machine, check_resolves, validate, validate_built
from workflow.hardware import cpu_has_native_bf16
from workflow.progress import StepProgressBar

CONF = str(ROOT / "conf")
OBJECTIVES = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "objective")) if f.endswith(".yaml"))


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_writes_checkpoint_metrics_and_grid(tmp_path, tiny_args):
    """Also #15 item 4: trainer.precision=auto on this CPU is bf16-mixed only with native bf16, and says so."""
    run = tmp_path / "run"
    proc = run_train([*tiny_args, "objective=score", "trainer.max_steps=3", "trainer.precision=auto",
                      f"hydra.run.dir={run}"])
    assert f"run folder: {run}" in proc.stdout
    assert "_target_: backbones.dit.DiT" in proc.stdout  # the resolved config is printed
    precision = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert f"trainer.precision=auto -> {precision} (CPU " in proc.stdout
    assert proc.stdout.count("`Trainer.fit` stopped: `max_steps=3` reached.") == 1  # printed once, not twice
    assert "`Trainer.fit` stopped" in (run / "train.log").read_text()

    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # plain types only: loadable without unpickling code
    assert ckpt["global_step"] == 3
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert isinstance(cfg, dict) and cfg["objective"]["_target_"].endswith("ScoreObjective")
    assert cfg["trainer"]["precision"] == precision
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


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPUs")


@pytest.mark.parametrize("overrides, expected", [
    (["objective=nope"], ["objective=nope is not an option", "diffusion, flow, score"]),
    (["objective=flow", "objective.schedule=cosine"], ["objective.schedule is not a key of objective=flow",
                                                       "path"]),
    (["experiment=digits", "trainer.precision=fp8"], ["trainer.precision='fp8'", "bf16-mixed", "auto"]),
    (["experiment=digits", "ckpt_path=/no/such.ckpt"], ["ckpt_path", "no such file"]),
    (["trainer.accelerator=cpu", "data.cache_dir=/no/cache"], ["data.cache_dir=/no/cache", "metadata.json",
                                                               "make latents", "make demo"]),
    pytest.param([], ["this machine has 0 NVIDIA GPU", "make demo", "trainer.accelerator=cpu"], marks=NO_GPU),
    pytest.param(["objective=score", "model=dit_b", "trainer.devices=8"], ["trainer.devices=8", "0 NVIDIA GPU"],
                 marks=NO_GPU),
    pytest.param(["trainer.accelerator=auto", "trainer.devices=4"], ["start 4 CPU processes",
                                                                      "trainer.accelerator=cpu"], marks=NO_GPU),
])
def test_config_errors_are_one_line_exit_2_before_torch(overrides, expected):
    """#11: one format and exit code for Hydra's composition errors, value errors and a machine that lacks what the
    run needs (GPUs, the latent cache), found before torch is imported; the message names the next command."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), *overrides], cwd=ROOT,
                          env=offline_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("config error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "lightning" not in imported


def test_cfg_job_after_the_overrides_prints_the_config():
    """The documented `python train.py <overrides> --cfg job`: the pinned run_name goes beside the user's overrides,
    not after `--cfg job` (argparse takes the overrides as one group)."""
    proc = run_train(["experiment=digits", "objective=score", "--cfg", "job"])
    assert "_target_: gen_objectives.objectives.score.ScoreObjective" in proc.stdout and "run_name: " in proc.stdout
    sys.path.insert(0, str(ROOT))
    from train import pinned_argv

    argv = pinned_argv(["-m", "experiment=digits", "objective=score,flow", "~data.vae", "--cfg", "job"])
    assert argv[:4] == ["-m", "experiment=digits", "objective=score,flow", "~data.vae"]
    assert argv[4].startswith("run_name=") and argv[5] == "sweep_keys=[objective]" and argv[6:] == ["--cfg", "job"]


def test_objective_value_errors_have_the_same_format(tiny_args):
    proc = run_train([*tiny_args, "objective=flow", "objective.path=bogus"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("config error: "), proc.stderr[-2000:]
    assert "objective=flow" in proc.stderr and "linear" in proc.stderr and "gvp" in proc.stderr


@pytest.mark.parametrize("override, expected", [
    ("trainer.precision=fp8", ["trainer.precision", "bf16-mixed", "32"]),
    ("ckpt_path=/no/such.ckpt", ["ckpt_path", "no such file"]),
    ("global_batch_size=100", ["global_batch_size", "not divisible"]),
])
def test_validation_names_key_and_choices(override, expected):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits", "objective=flow", "trainer.devices=8", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for text in expected:
        assert text in str(err.value)


def test_sampler_of_another_objective_names_the_choices():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits", "objective=flow", "callbacks.sample_grid.sampler=rk4"])
    with pytest.raises(ConfigError, match=r"callbacks.sample_grid.sampler='rk4'.*heun.*dopri5"):
        validate_built(cfg, build_objective(cfg))


def help_options() -> list[tuple[str, str]]:
    """(group, option) for every option `python train.py --help` lists."""
    proc = run_train(["--help"])
    listed = proc.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    return [(group.strip(), option.strip()) for line in listed.splitlines() if ": " in line
            for group, options in [line.split(": ", 1)] for option in options.split(",")]


def test_every_option_help_lists_builds_or_says_why_not(tmp_path):
    """#11: `callbacks=fid` crashed with AttributeError. Each option, on the digits CPU setup, either builds every
    object train.py trains with or stops with one config error line (e.g. a GPU option on a CPU machine)."""
    options = help_options()
    assert ("callbacks", "fid") in options and ("experiment", "dit_b_imagenet") in options
    cpu_digits = ["data=digits", "data.image_size=8", "model=dit_tiny", "trainer=cpu", "logger=csv",
                  "global_batch_size=null"]  # the default config (with its callbacks) on digits and a CPU
    for group, option in options:
        base = [] if group == "experiment" else cpu_digits[1:] if group.startswith("data/") else cpu_digits
        overrides = [*base, f"{group}={option}",
                     f"run_dir={tmp_path / group / option}"]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        try:
            validate(cfg)
            check_resolves(cfg)
            check_machine(cfg)
            if group != "model":  # the model options are full-size DiTs: composing them is the check
                build_run(cfg)
        except ConfigError as e:
            assert "\n" not in str(e) and str(e), (group, option)


def test_sweep_runs_past_a_bad_job_and_writes_a_summary(tmp_path, tiny_args):
    """#11: one bad point (beta_max < beta_min) aborted the sweep; now it is reported, the rest run, and the sweep
    folder gets summary.csv/.md; job folders are named by the swept values."""
    sweep = tmp_path / "sweep"
    proc = run_train(["-m", *tiny_args, "objective=score,flow", "objective.beta_max=0.05,10", "trainer.max_steps=2",
                      "logger=wandb", f"hydra.sweep.dir={sweep}"], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not every job completed
    assert "sweep: 2 of 4 jobs completed" in proc.stdout, proc.stdout[-3000:]
    jobs = ["0_objective=score,objective.beta_max=0.05", "1_objective=score,objective.beta_max=10",
            "2_objective=flow,objective.beta_max=0.05", "3_objective=flow,objective.beta_max=10"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()) == jobs
    with open(sweep / "summary.csv") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == jobs and (sweep / "summary.md").read_text().count("\n") == 2 + 4
    for job in jobs:
        bad = job.endswith("0.05")
        assert rows[job]["status"] == ("config error" if bad else "completed"), rows[job]
        assert ("beta_min" in rows[job]["error"]) == bad and bool(rows[job]["train/loss"]) != bad
        assert f"objective.beta_max={'0.05' if bad else '10'}" in rows[job]["overrides"]
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file() != bad
    cfgs = [torch.load(sweep / j / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["cfg"]
            for j in jobs[1::2]]
    groups = {c["logger"]["group"] for c in cfgs}
    assert len(groups) == 2 and all("beta_max=10" in g for g in groups)


def test_wandb_offline_fallback_flat_config_failed_run_and_resumed_id(tmp_path, tiny_args):
    """Without a key or network W&B logs offline (said at start-up); the config arrives as flat keys; a run that
    raises is closed with exit code 1 (failed); the resumed run continues the same W&B run id."""
    run = tmp_path / "run"
    env = offline_env(WANDB_MODE=None, WANDB_API_KEY=None, HOME=str(tmp_path), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
                      WANDB_BASE_URL="http://127.0.0.1:9", WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"))
    args = [*tiny_args, "logger=wandb", "run_name=wb", "last_ckpt_every_n_steps=2", f"hydra.run.dir={run}"]
    proc = run_train([*args, "trainer.max_steps=6", "module.nonfinite_check_every_n_steps=1",
                      "+callbacks.nan={_target_:probes.NaNOnRank,rank:0,step:3}"], env=env, check=False)
    assert proc.returncode == 1 and "NonFiniteLossError" in proc.stderr, proc.stderr[-3000:]
    assert "logging OFFLINE" in proc.stdout and "no W&B API key" in proc.stdout
    proc = run_train([*args, "trainer.max_steps=4", "ckpt_path=last"], env=env)
    runs = []
    for path in sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "*.wandb"))):
        records = list(wandb_records(path))
        run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
        exit_code = next(r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit")
        config = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
        runs.append((run_id, exit_code, config))
    assert [code for _, code, _ in runs] == [1, 0], runs  # the failed segment, then the resumed one
    assert runs[0][0] == runs[1][0]  # one W&B run over both segments
    assert {"objective.beta_max", "model.depth", "trainer.max_steps", "seed"} <= runs[0][2]  # flat keys
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


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


def test_progress_bar_counts_steps_not_epochs_to_minus_two(tmp_path):
    """#11: with max_epochs=-1 (training bounded by steps) Lightning's bar read `Epoch 48/-2`."""
    import lightning as L

    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=2000, max_epochs=-1, callbacks=[bar], logger=False, default_root_dir=tmp_path)
    assert bar._get_train_description(48) == "Epoch 48"
    assert bar.get_metrics(trainer, None)["step"] == "0/2000"
