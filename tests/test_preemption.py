"""Pre-emption as SLURM does it: SIGTERM to the whole process group, DataLoader workers included. The workers
ignore it, the main process saves last.ckpt at a step boundary and exits 143, and the resumed run is
bit-identical to one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, offline_env, run_train
from test_resume import assert_bit_identical

from workflow.preemption import PREEMPTED_EXIT_CODE


def signal_after_first_save(proc: subprocess.Popen, last, sig: int, settle: float = 0.0) -> str:
    """Waits for last.ckpt, then sends `sig` to proc's whole process group (the main process and its DataLoader
    workers, as SLURM does) and returns proc's output; the group is killed if anything goes wrong."""
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert last.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "too slow"
        time.sleep(settle)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def test_sigterm_to_the_process_group_with_workers_saves_exits_143_and_resumes_exactly(tmp_path, tiny_args):
    run, full = tmp_path / "run", tmp_path / "full"
    args = [*tiny_args, "data.num_workers=2", "logger=none", "run_name=pre", "last_ckpt_every_n_steps=5"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "trainer.max_steps=100000",
                             f"hydra.run.dir={run}"], cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own process group
    last = run / "checkpoints" / "last.ckpt"
    out = signal_after_first_save(proc, last, signal.SIGTERM, settle=0.5)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "pre-empted by SIGTERM at step" in out and "DataLoader worker" not in out, out[-3000:]
    step = torch.load(last, weights_only=True)["global_step"]
    assert f"pre-empted by SIGTERM at step {step}:" in out and step >= 5  # last.ckpt is the state at the stop

    # resume for 3 more steps; the same steps without interruption give the same bits
    run_train([*args, f"trainer.max_steps={step + 3}", "ckpt_path=last", f"hydra.run.dir={run}"])
    run_train([*args, f"trainer.max_steps={step + 3}", f"hydra.run.dir={full}"])
    diffs = assert_bit_identical(full / "checkpoints" / "last.ckpt", last)
    print(f"SIGTERM at step {step} with 2 workers -> exit {proc.returncode}; max |diff| after resume: {diffs}")


def test_slurm_time_limit_simulated_checkpoint_then_submitit_requeue_then_auto_resume(tmp_path, tiny_args):
    """SLURM simulated on CPU (fake SLURM_* variables, submitit's USR2 handler replaced by a recorder): USR2 stops
    training at a step boundary, last.ckpt is written BEFORE the requeue handler runs (it runs once, in the main
    process), Lightning does not requeue, exit 143; the requeued job (SLURM_RESTART_COUNT=1) resumes by itself."""
    run, log = tmp_path / "run", tmp_path / "requeue.json"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1",
             "SLURM_RESTART_COUNT": "0"}
    env = offline_env(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", FAKE_REQUEUE_LOG=str(log), FAKE_RUN_DIR=str(run), **slurm)
    args = [*tiny_args, "data.num_workers=1", "logger=none", "run_name=slurm", "last_ckpt_every_n_steps=5",
            f"hydra.run.dir={run}"]
    boot = ("import signal, runpy, sys, probes; signal.signal(signal.SIGUSR2, probes.fake_submitit_requeue); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", boot, str(ROOT / "train.py"), *args, "trainer.max_steps=100000"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    out = signal_after_first_save(proc, last, signal.SIGUSR2)  # SLURM signals the whole step, workers included
    assert proc.returncode == PREEMPTED_EXIT_CODE and "pre-empted by SIGUSR2" in out, out[-3000:]
    assert "requeing job" not in out and "scontrol" not in out  # Lightning's auto-requeue is off
    record = json.loads(log.read_text())
    step = torch.load(last, weights_only=True)["global_step"]
    assert record == {"signal": int(signal.SIGUSR2), "last_ckpt_step": step}  # saved first, then requeued

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: the same command line, no ckpt_path
    proc = run_train([*args, f"trainer.max_steps={step + 2}"], env=env)
    assert "requeued SLURM job: resuming" in proc.stdout and f"resuming from {last}" in proc.stdout
    assert torch.load(last, weights_only=True)["global_step"] == step + 2
