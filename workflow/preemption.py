"""Pre-emption: SIGTERM/USR1/USR2 stop training at a step boundary every rank agrees on; last.ckpt is saved
(callbacks/last_checkpoint.py) and train.py exits with PREEMPTED_EXIT_CODE.

Who does what (docs/WORKFLOW.md, "Pre-emption"):
- the signal handler only records the signal (DataLoader workers ignore these signals: workflow/data_order.py);
- one process checks the record after every optimizer step (a Python bool, no device sync); several ranks
  all-reduce it every `check_every_n_steps` steps, so all of them stop at the same step (this replaces
  Lightning's per-step SIGTERM broadcast, a host sync on every step);
- Lightning then finishes the step (metrics logged) and raises SIGTERMException; LastCheckpoint saves;
- train.py exits with 143 (128 + SIGTERM), i.e. "pre-empted, resume me", never 0;
- requeue is NOT done here: under `hydra/launcher=slurm` submitit owns it (its USR2 handler runs after the
  checkpoint and requeues within `max_num_timeout`), and SLURM requeues pre-empted jobs itself (`--requeue`).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import lightning as L
import torch

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job stopped by SIGTERM
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preemption(L.Callback):
    """Turns a stop signal into a clean stop at an agreed step boundary (see the module docstring)."""

    def __init__(self, check_every_n_steps: int = 10):
        if check_every_n_steps < 1:
            raise ValueError(f"preempt_check_every_n_steps={check_every_n_steps} must be >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None  # the signal number, once one arrived
        self.stopped_at: int | None = None  # the step at which training stopped for it
        self.deferred: dict[int, Any] = {}  # handlers found in place (submitit's), run by train.py after saving
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def _install(self, trainer: L.Trainer) -> None:
        """Replaces Lightning's SIGTERM handler (it broadcasts inside the handler) and its per-step broadcast."""
        if self._installed:
            return
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if sig != signal.SIGTERM and callable(previous) and previous is not self._handler:
                self.deferred[sig] = previous  # e.g. submitit's checkpoint_and_try_requeue on USR2
            signal.signal(sig, self._handler)
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._installed = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate() or self.stopped_at is not None:
            return
        if trainer.world_size == 1:
            stop = self.received is not None
        elif trainer.global_step % self.check_every_n_steps == 0:
            flag = torch.tensor(0 if self.received is None else int(self.received), device=pl_module.device)
            flag = trainer.strategy.reduce(flag, reduce_op="max")
            stop = int(flag) != 0  # one host sync every check_every_n_steps steps
            if stop and self.received is None:
                self.received = int(flag)  # another rank got it
        else:
            stop = False
        if stop:
            self.stopped_at = trainer.global_step
            trainer._signal_connector.received_sigterm = True  # Lightning ends this step, then raises

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "?"

    def run_deferred(self) -> None:
        """Calls the handler that was in place for the received signal (submitit: requeue, then sys.exit)."""
        handler = self.deferred.get(self.received or 0)
        if handler is None:
            return
        try:
            handler(self.received, None)
        except SystemExit:
            pass  # submitit exits after requeueing; train.py exits with PREEMPTED_EXIT_CODE instead
        except Exception as e:  # e.g. submitit's "timed-out too many times": nothing to requeue
            print(f"requeue handler: {e.__class__.__name__}: {e}", flush=True)
