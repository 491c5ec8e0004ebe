"""FID (and sFID, IS, precision/recall, KID; digits: the digits-CNN analogues) during training.

A thin Lightning callback over the evaluation/ package, which evaluate.py shares: the same samples for the
same settings, the same references (keyed, rank 0 decides), the same matmul precision whatever train.py
set, and the same record format. Samples are kept in memory, not written to disk.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from evaluation.checkpoint import weights_fingerprint
from evaluation.distributed import rank_world
from evaluation.engine import append_record, evaluate_model, make_record, sample_spec, summary_line
from evaluation.features import build_extractor, resolve_extractor_names
from evaluation.matmul import DEFAULT_MATMUL_PRECISION, check_matmul_precision, matmul_precision
from evaluation.metrics import MetricSet
from evaluation.reference import DEFAULT_ROWS, get_reference
from evaluation.samples import LABEL_MODES


class FIDCallback(Callback):
    """Every `every_n_steps` and/or at the end of training: sample with the EMA weights, measure, log.

    Logged as fid/<name> (fid/fid_10k, fid/sfid_10k, fid/inception_score, fid/precision, fid/recall, fid/kid;
    digits: fid/digits_fid_2k, fid/digits_class_accuracy, ...) plus fid/num_steps, fid/cfg_scale and
    fid/nfe; with `records` set, one JSON line per evaluation is appended there as evaluate.py does.
    """

    def __init__(self, num_samples: int = 10000, batch_size: int = 250, every_n_steps: int = 0,
                 at_train_end: bool = True, sampler: str | None = None, num_steps: int | None = None,
                 cfg_scale: float = 1.0, seed: int = 0, labels: str = "uniform", extractor=None,
                 ref_stats: str | None = None, compute_ref_if_missing: bool = True, ref_max_images: int | None = None,
                 ref_subset_seed: int = 0, ref_rows: int = DEFAULT_ROWS, precision_recall: bool = True,
                 kid: bool = True, fid_bootstrap: int = 0, matmul_precision: str = DEFAULT_MATMUL_PRECISION,
                 feature_batch_size: int = 250, records: str | None = None, progress: bool = True):
        """extractor: the `extractor` config block (name: inception | digits | dinov2 | auto, weights paths ...),
        or extractor modules (one or a list) built by the caller."""
        super().__init__()
        if extractor is None:
            raise ValueError("callbacks.fid.extractor must be set (e.g. {name: inception} or {name: digits})")
        if labels not in LABEL_MODES:
            raise ValueError(f"callbacks.fid.labels={labels!r}; choose one of {LABEL_MODES}")
        self.matmul_precision = check_matmul_precision(matmul_precision, "callbacks.fid.matmul_precision")
        self.num_samples, self.batch_size, self.seed, self.labels = num_samples, batch_size, seed, labels
        self.every_n_steps, self.at_train_end = every_n_steps, at_train_end
        self.sampler, self.num_steps, self.cfg_scale = sampler, num_steps, cfg_scale
        self.extractor_cfg = extractor
        self.ref_stats, self.compute_ref_if_missing, self.ref_max_images = ref_stats, compute_ref_if_missing, ref_max_images
        self.ref_subset_seed, self.ref_rows = ref_subset_seed, ref_rows
        self.options = {"precision_recall": precision_recall, "kid": kid, "fid_bootstrap": fid_bootstrap}
        self.feature_batch_size, self.records, self.progress = feature_batch_size, records, progress
        self.extractors: list | None = None
        self.references: list | None = None
        self.last_metrics: dict = {}
        self.last_record: dict = {}
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.measure(trainer, pl_module)

    def _build(self, dm, data_cfg: dict, device: torch.device) -> None:
        """Extractors and references on first use (rank 0 decides about every reference file)."""
        given = self.extractor_cfg
        if isinstance(given, torch.nn.Module) or (isinstance(given, list | tuple) and given
                                                    and isinstance(given[0], torch.nn.Module)):
            extractors = [given] if isinstance(given, torch.nn.Module) else list(given)
        else:
            opts = dict(given)
            data = {"_target_": type(dm).__module__ + "." + type(dm).__name__, "image_size": dm.image_size,
                    **data_cfg}
            names = resolve_extractor_names(opts.get("name", "auto"), data["_target_"].endswith("DigitsDataModule"))
            if opts.get("dinov2") and "dinov2" not in names:
                names.append("dinov2")
            extractors = [build_extractor(n, opts, data) for n in names]
        self.extractors = [e.to(device).eval() for e in extractors]
        self.references = [get_reference(self.ref_stats if i == 0 else None, e, dm, device,
                                         self.compute_ref_if_missing, self.ref_max_images, self.feature_batch_size,
                                         subset_seed=self.ref_subset_seed, rows=self.ref_rows,
                                         data_cfg=data_cfg or None, progress=self.progress)
                           for i, e in enumerate(self.extractors)]

    def measure(self, trainer, pl_module) -> dict:
        """Generate this rank's share, combine over ranks, log and return the metrics."""
        device = pl_module.device
        self._last_step = trainer.global_step
        dm = trainer.datamodule
        network = pl_module.ema_net()
        spec = sample_spec(pl_module.objective, num_samples=self.num_samples, batch_size=self.batch_size,
                           seed=self.seed, sampler=self.sampler, num_steps=self.num_steps,
                           cfg_scale=self.cfg_scale, labels=self.labels)
        was_training = pl_module.training
        pl_module.eval()
        t0 = time.time()
        with matmul_precision(self.matmul_precision):
            if self.extractors is None:
                self._build(dm, dict((pl_module.hparams.get("cfg") or {}).get("data") or {}), device)
            metrics = MetricSet(self.extractors, self.references, spec.num_samples, device, seed=spec.seed,
                                **self.options)
            values, facts = evaluate_model(network, pl_module.objective, dm, spec, metrics, device,
                                           feature_batch_size=self.feature_batch_size, progress=self.progress)
        pl_module.train(was_training)
        record = make_record(values, facts, spec, extractors=self.extractors, references=self.references,
                             ckpt=None, step=trainer.global_step, fingerprint=weights_fingerprint(network.state_dict()),
                             matmul_precision=self.matmul_precision, fid_seconds=time.time() - t0)
        self.last_metrics, self.last_record = {**values, "num_steps": spec.num_steps, "cfg_scale": spec.cfg_scale,
                                               "sampler": spec.sampler, "nfe": facts["nfe"]}, record
        if rank_world()[0] == 0:
            numeric = {f"fid/{k}": float(v) for k, v in self.last_metrics.items()
                       if isinstance(v, int | float) and v is not None}
            if trainer.logger is not None:
                trainer.logger.log_metrics(numeric, step=trainer.global_step)
            if self.records:
                append_record(self.records, record)
        notes = "".join(f" [{e.name}: {e.note}]" for e in self.extractors if e.note)
        rank_zero_only(print)(f"[fid] step {trainer.global_step}, {spec.sampler} {spec.num_steps} steps, "
                              f"cfg {spec.cfg_scale:g}: {summary_line(values)}{notes}")
        return self.last_metrics
