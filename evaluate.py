"""Sample from a checkpoint and report FID, sFID, IS, precision, recall, KID (digits: the digits-CNN
analogues; optionally FD-DINOv2): `make eval CKPT=path`. The work is done by the evaluation/ package,
which the training callback shares; this file reads the config and writes the outputs.

Multi-GPU: `torchrun --nproc_per_node=8 evaluate.py ckpt=...` (each rank generates every world-th chunk).
Samples are written as chunk files (tmp + rename), so an interrupted run continues where it stopped and
a larger num_samples reuses the smaller run's samples (same seed and batch_size). Protocol: docs/EVALUATION.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from evaluation.checkpoint import NotACheckpointError, load_eval_model
from evaluation.distributed import barrier, rank_world
from evaluation.engine import append_record, evaluate_model, make_record, sample_spec, summary_line
from evaluation.features import build_extractor, resolve_extractor_names
from evaluation.matmul import check_matmul_precision, matmul_precision
from evaluation.metrics import MetricSet
from evaluation.reference import ReferenceError, get_reference
from evaluation.samples import LABEL_MODES, ChunkStore, save_grid
from workflow.config_guard import instantiate_trusted


def setup_distributed() -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def check_config(cfg: DictConfig) -> None:
    """Enumerated keys, before anything heavy: one line naming the key and the choices."""
    check_matmul_precision(cfg.matmul_precision)
    if cfg.labels not in LABEL_MODES:
        raise ValueError(f"labels={cfg.labels!r}; choose one of {LABEL_MODES}")
    for key in ("num_samples", "batch_size", "feature_batch_size"):
        if int(cfg[key]) < 1:
            raise ValueError(f"{key}={cfg[key]} must be >= 1")


def default_out_dir(ckpt: Path, step: int | None, fingerprint: str, spec) -> Path:
    """<ckpt dir>/eval/<ckpt stem>-step<N>-<fingerprint>/<sampler>-<steps>steps-cfg<scale>-<labels>-seed<s>-bs<b>:
    one folder per sample set, and a rewritten checkpoint (other weights) never lands in the old folder."""
    tag = (f"{spec.sampler}-{spec.num_steps}steps-cfg{spec.cfg_scale:g}-{spec.labels}-seed{spec.seed}"
           f"-bs{spec.batch_size}")
    return ckpt.parent / "eval" / f"{ckpt.stem}-step{'NA' if step is None else step}-{fingerprint[:8]}" / tag


def run(cfg: DictConfig) -> dict:
    """Everything evaluate.py does; returns the record (on every rank)."""
    check_config(cfg)
    ckpt = Path(str(cfg.ckpt or ""))
    model = load_eval_model(ckpt, weights_cfg=cfg)
    device = setup_distributed()
    rank, world = rank_world()
    data_cfg = {**model.run_cfg["data"], **OmegaConf.to_container(cfg.data_overrides, resolve=True)}
    datamodule = instantiate_trusted(data_cfg, f"{ckpt}: data")  # read from the file: project classes only
    spec = sample_spec(model.objective, num_samples=cfg.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                       sampler=cfg.sampler, num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, labels=cfg.labels)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(ckpt.resolve(), model.step, model.fingerprint, spec)
    store = ChunkStore(out_dir)
    settings = {"ckpt_step": model.step, "ckpt_fingerprint": model.fingerprint, **vars(spec),
                "matmul_precision": cfg.matmul_precision}
    settings.pop("num_samples")  # a larger run reuses a smaller one's chunks
    network = model.network.to(device)
    model.objective.to(device)
    names = resolve_extractor_names(cfg.extractor.name, data_cfg["_target_"].endswith("DigitsDataModule"))
    if cfg.extractor.dinov2 and "dinov2" not in names:
        names.append("dinov2")

    with matmul_precision(cfg.matmul_precision):
        # extractors and references first: missing weights or a wrong reference fail before any sampling
        t0 = time.time()
        extractors = [build_extractor(n, cfg.extractor, data_cfg).to(device).eval() for n in names]
        references = [get_reference(cfg.ref_stats if i == 0 else None, e, datamodule, device,
                                    cfg.compute_ref_if_missing, cfg.ref_max_images, cfg.feature_batch_size,
                                    subset_seed=cfg.ref_subset_seed, rows=cfg.ref_rows, data_cfg=data_cfg,
                                    progress=cfg.progress)
                      for i, e in enumerate(extractors)]
        ref_seconds = time.time() - t0
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        store.claim(settings)
        metrics = MetricSet(extractors, references, spec.num_samples, device,
                            precision_recall=cfg.precision_recall, kid=cfg.kid, fid_bootstrap=cfg.fid_bootstrap,
                            seed=spec.seed)
        values, facts = evaluate_model(network, model.objective, datamodule, spec, metrics, device, store=store,
                                       feature_batch_size=cfg.feature_batch_size, progress=cfg.progress)
    barrier()
    record = make_record(values, facts, spec, extractors=extractors, references=references, ckpt=str(ckpt.resolve()),
                         step=model.step, fingerprint=model.fingerprint, matmul_precision=cfg.matmul_precision,
                         out_dir=str(out_dir), ref_seconds=ref_seconds)
    if rank == 0:
        first = min(cfg.grid_samples, spec.num_samples)
        save_grid(store.first_images(first, spec.num_samples, spec.batch_size), out_dir / "samples_grid.png",
                  cfg.grid_nrow)
        if cfg.save_npz:
            shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)
            record["npz"] = str(store.write_adm_npz(spec.num_samples, spec.batch_size, shape))
        path = append_record(out_dir / "metrics.jsonl", record)
        for e in extractors:
            if e.note:
                print(f"[eval] {e.name}: {e.note}")
        print(f"[eval] {summary_line(values)}")
        print(f"[eval] step {model.step} ({model.fingerprint}), {spec.sampler} {spec.num_steps} steps, "
              f"cfg {spec.cfg_scale:g}, {facts['nfe']} NFE; appended to {path}; grid {out_dir / 'samples_grid.png'}")
    barrier()
    return record


@hydra.main(config_path="conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (NotACheckpointError, ReferenceError, FileNotFoundError, ValueError) as err:
        # a bad input: its message names the key or file (a traceback adds nothing; HYDRA_FULL_ERROR=1 shows it)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
