"""Pre-emption as SLURM does it: SIGTERM to the whole process group, DataLoader workers included. The workers
ignore it, the main process saves last.ckpt at a step boundary and exits 143, and the resumed run is
bit-identical to one never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, offline_env, run_train
from test_resume import assert_bit_identical

from workflow.preemption import PREEMPTED_EXIT_CODE


def test_sigterm_to_the_process_group_with_workers_saves_exits_143_and_resumes_exactly(tmp_path, tiny_args):
    run, full = tmp_path / "run", tmp_path / "full"
    args = [*tiny_args, "data.num_workers=2", "logger=none", "run_name=pre", "last_ckpt_every_n_steps=5"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "trainer.max_steps=100000",
                             f"hydra.run.dir={run}"], cwd=ROOT, env=offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # its own process group
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    try:
        assert last.exists(), proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "too slow"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its DataLoader workers, as SLURM does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "pre-empted by SIGTERM at step" in out and "DataLoader worker" not in out, out[-3000:]
    step = torch.load(last, weights_only=True)["global_step"]
    assert step >= 5 and step % 5, step  # saved at the stop, not only the periodic save

    # resume for 3 more steps; the same steps without interruption give the same bits
    run_train([*args, f"trainer.max_steps={step + 3}", "ckpt_path=last", f"hydra.run.dir={run}"])
    run_train([*args, f"trainer.max_steps={step + 3}", f"hydra.run.dir={full}"])
    diffs = assert_bit_identical(full / "checkpoints" / "last.ckpt", last)
    print(f"SIGTERM at step {step} with 2 workers -> exit {proc.returncode}; max |diff| after resume: {diffs}")
