"""The evaluation loop the training callback and evaluate.py both run, and the record it leaves.

`evaluate_model` samples this rank's chunks (reading the ones a chunk store already holds), extracts
every extractor's features from the same uint8 images in one pass and returns metrics combined exactly
over ranks. It runs under the one documented matmul precision (evaluation.matmul). `make_record` is the
JSON line appended per evaluation: every number with what it depends on.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from evaluation.distributed import all_reduce_sum, rank_world
from evaluation.features import extractor_summary
from evaluation.metrics import MetricSet
from evaluation.samples import ChunkStore, chunks_for_rank, generate_chunk


@dataclass(frozen=True)
class SampleSpec:
    """What defines a sample set (with the checkpoint): the same spec gives the same samples."""

    num_samples: int
    batch_size: int
    seed: int
    sampler: str
    num_steps: int
    cfg_scale: float
    labels: str = "uniform"


def sample_spec(objective, *, num_samples: int, batch_size: int, seed: int, sampler: str | None,
                num_steps: int | None, cfg_scale: float, labels: str = "uniform") -> SampleSpec:
    """The spec with the objective's defaults filled in (None = the objective's default sampler/steps)."""
    sampler = sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise ValueError(f"sampler={sampler!r}; choose one of {tuple(objective.samplers)}")
    steps = int(num_steps if num_steps is not None else objective.default_num_steps)
    return SampleSpec(int(num_samples), int(batch_size), int(seed), sampler, steps, float(cfg_scale), labels)


class CallCounter(nn.Module):
    """Counts network evaluations (NFE): one call, however large its (CFG-doubled) batch (benchmarks use it too)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)

    def reset(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):
        """The wrapped network's attributes (e.g. learn_sigma) for code that reads them."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("net"), name)


@torch.no_grad()
def evaluate_model(network: nn.Module, objective: nn.Module, datamodule, spec: SampleSpec, metrics: MetricSet,
                   device: torch.device, *, store: ChunkStore | None = None, feature_batch_size: int = 250,
                   progress: bool = True) -> tuple[dict, dict]:
    """(metrics, run facts) of spec's samples from `network`; every rank must call it."""
    rank, world = rank_world()
    shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)
    counter = CallCounter(network)

    def generate(noise: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return objective.sample(counter, noise, labels, sampler=spec.sampler, num_steps=spec.num_steps,
                                cfg_scale=spec.cfg_scale, generator=generator)

    mine = chunks_for_rank(spec.num_samples, spec.batch_size, rank, world)
    generated, sampling_seconds, feature_seconds, nfe_sum, nfe_chunks = 0, 0.0, 0.0, 0.0, 0
    bar = tqdm(total=sum(e - s for _, s, e in mine), unit="sample", desc=f"evaluation samples (x{world} ranks)",
               disable=not progress or rank != 0, dynamic_ncols=True)
    for c, s, e in mine:
        found = store.read(c, s, e) if store is not None else None
        if found is None:
            t0 = time.perf_counter()
            counter.calls = 0
            images, labels = generate_chunk(generate, datamodule.decode, s, e, shape, datamodule.num_classes,
                                            spec.seed, device, spec.labels)
            nfe = float(counter.calls)
            sampling_seconds += time.perf_counter() - t0
            generated += e - s
            if store is not None:
                store.write(c, images.permute(0, 2, 3, 1).numpy(), labels.numpy(), s, e, nfe)
        else:
            images, labels, nfe = torch.from_numpy(found[0]).permute(0, 3, 1, 2), torch.from_numpy(found[1]), found[2]
        if nfe is not None:
            nfe_sum, nfe_chunks = nfe_sum + nfe, nfe_chunks + 1
        t0 = time.perf_counter()
        for i in range(0, e - s, feature_batch_size):
            j = min(i + feature_batch_size, e - s)
            metrics.update(images[i:j], labels[i:j], torch.arange(s + i, s + j))
        feature_seconds += time.perf_counter() - t0
        bar.update(e - s)
    bar.close()
    t0 = time.perf_counter()
    values = metrics.finalize()
    feature_seconds += time.perf_counter() - t0
    totals = all_reduce_sum(torch.tensor([generated, sampling_seconds, nfe_sum, nfe_chunks], dtype=torch.float64))
    facts = {"samples_generated": int(totals[0]), "sampling_seconds": float(totals[1]) / world,
             "feature_seconds": feature_seconds, "world_size": world,
             "nfe": float(totals[2] / totals[3]) if totals[3] > 0 else None,
             "samples_per_second": float(totals[0] * world / totals[1]) if totals[1] > 0 else None}
    return values, facts


def make_record(metrics: dict, facts: dict, spec: SampleSpec, *, extractors: list, references: list,
                ckpt: str | None, step: int | None, fingerprint: str, matmul_precision: str, **extra) -> dict:
    """One evaluation as one JSON-able dict: the numbers, then everything they depend on."""
    refs = [{**r.identity, "path": r.path} for r in references]
    return {
        **metrics,
        **asdict(spec),
        "nfe": facts.get("nfe"),
        "ckpt": ckpt, "ckpt_step": step, "ckpt_fingerprint": fingerprint,
        "extractors": [extractor_summary(e) for e in extractors],
        "reference": refs[0] if refs else None, "references": refs,
        "ref_stats": references[0].path if references else None,
        "matmul_precision": matmul_precision,
        **{k: v for k, v in facts.items() if k != "nfe"},
        **extra,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_record(path: str | os.PathLike, record: dict) -> Path:
    """Append one JSON line (one write, flushed and synced): earlier evaluations are never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return path


def summary_line(metrics: dict) -> str:
    """The numbers, labelled, on one line (floats to 4 significant digits)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
