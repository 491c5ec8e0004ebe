"""Every metric of one evaluation from the same samples, in one pass, combined exactly over DDP ranks.

Per extractor: the Frechet distance of each feature kind (FID on pool, sFID on spatial, FD-DINOv2),
Inception Score (or, for the digits CNN whose logits are the data's classes, class accuracy), and from
the pool features gathered in sample order: precision/recall (ADM, k = 3), KID and the FID bootstrap.
"""

from __future__ import annotations

import torch

from evaluation.distributed import all_reduce_sum, gather_rows
from evaluation.kid import kid
from evaluation.manifold import precision_recall
from evaluation.stats import (
    ADM_IS_SPLIT_SIZE,
    FeatureStats,
    InceptionScoreStats,
    bootstrap_frechet_std,
    frechet_distance,
)


def count_suffix(num_samples: int) -> str:
    """10k / 50k for round thousands, the count otherwise (FID depends on it: fid_10k is not fid_50k)."""
    return f"{num_samples // 1000}k" if num_samples % 1000 == 0 else str(num_samples)


class MetricAccumulator:
    """One extractor's sums, IS splits, class counts and pool rows for this rank's share of the samples."""

    def __init__(self, extractor: torch.nn.Module, num_samples: int, device: torch.device | str = "cpu",
                 is_split_size: int = ADM_IS_SPLIT_SIZE, precision_recall: bool = True, kid: bool = True,
                 fid_bootstrap: int = 0, seed: int = 0):
        self.extractor = extractor
        self.num_samples = num_samples
        self.device = torch.device(device)
        self.stats = {key: FeatureStats(dim, device=self.device) for key, dim in extractor.dims.items()}
        self.is_stats = (InceptionScoreStats(num_samples, extractor.num_logits, is_split_size)
                         if extractor.num_logits and not extractor.logits_are_data_classes else None)
        self.want_pr, self.want_kid, self.fid_bootstrap, self.seed = precision_recall, kid, fid_bootstrap, seed
        self.keep_rows = precision_recall or kid or fid_bootstrap >= 2
        self.rows: list[torch.Tensor] = []
        self.row_indices: list[torch.Tensor] = []
        self.correct = 0
        self.counted = 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        """Add uint8 images with the labels they were conditioned on and their global sample indices."""
        feats = self.extractor(images.to(self.device))
        for key, st in self.stats.items():
            st.update(feats[key])
        if self.is_stats is not None:
            self.is_stats.update(feats["logits"], indices)
        if self.extractor.logits_are_data_classes:
            self.correct += int((feats["logits"].argmax(1).cpu() == labels.cpu()).sum())
            self.counted += len(labels)
        if self.keep_rows:
            self.rows.append(feats["pool"].float().cpu())
            self.row_indices.append(torch.as_tensor(indices).cpu().long())

    def finalize(self, ref) -> dict:
        """All-reduce (every rank must call this) and return the metrics, the same on every rank."""
        ext = self.extractor
        for st in self.stats.values():
            st.all_reduce()
        n = self.stats["pool"].count
        suffix = count_suffix(n)
        out: dict = {"num_samples": n}
        moments = {key: (st.mean(), st.cov()) for key, st in self.stats.items()}
        if ref is not None:
            for key, (mu, sigma) in moments.items():
                if key in ref.stats:
                    out[f"{ext.fd_names[key]}_{suffix}"] = frechet_distance(mu, sigma, *ref.stats[key])
        if self.is_stats is not None:
            out[f"{ext.prefix}inception_score"] = self.is_stats.all_reduce().score()
        if ext.logits_are_data_classes:
            total = all_reduce_sum(torch.tensor([float(self.correct), float(self.counted)], dtype=torch.float64))
            out[f"{ext.prefix}class_accuracy"] = float(total[0] / total[1])
        if self.keep_rows:
            dim = ext.dims["pool"]
            local = torch.cat(self.rows) if self.rows else torch.zeros(0, dim)
            idx = torch.cat(self.row_indices) if self.row_indices else torch.zeros(0, dtype=torch.long)
            rows = gather_rows(local, idx, self.num_samples).to(self.device)  # every sample, in index order
            out.update(self._from_rows(rows, ref, suffix))
        out["_moments"] = moments
        return out

    def _from_rows(self, rows: torch.Tensor, ref, suffix: str) -> dict:
        ext, out = self.extractor, {}
        if ref is None:
            return out
        if ref.rows is not None and len(ref.rows) > 3:
            ref_rows = torch.from_numpy(ref.rows).to(self.device)
            if self.want_pr:
                out[f"{ext.prefix}precision"], out[f"{ext.prefix}recall"] = precision_recall(ref_rows, rows)
            if self.want_kid:
                out[f"{ext.prefix}kid"], out[f"{ext.prefix}kid_stderr"] = kid(rows, ref_rows)
        if self.fid_bootstrap >= 2 and "pool" in ref.stats:
            out[f"{ext.fd_names['pool']}_{suffix}_bootstrap_std"] = bootstrap_frechet_std(
                rows, *ref.stats["pool"], replicates=self.fid_bootstrap, seed=self.seed)
        return out


class MetricSet:
    """The accumulators of every extractor of one evaluation: each batch of samples is extracted once per
    extractor, in the same pass."""

    def __init__(self, extractors: list, references: list, num_samples: int, device, **options):
        self.pairs = [(MetricAccumulator(e, num_samples, device, **options), r) for e, r in zip(extractors, references)]

    def update(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        for acc, _ in self.pairs:
            acc.update(images, labels, indices)

    def finalize(self) -> dict:
        out: dict = {}
        for acc, ref in self.pairs:
            m = acc.finalize(ref)
            m.pop("_moments")
            out.update(m)
        return out
