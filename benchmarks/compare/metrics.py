"""What one trained checkpoint scores on digits: per sampler, digits-FID, KID and class accuracy of a sample set
with their bootstrap spreads; the converged NLL (dopri5, exact divergence) in dequantised discrete bits/dim, with
fixed-step solvers beside it; diffusion's ELBO.

digits-FID / digits-KID use the penultimate features of a small digits CNN (NOT Inception). Sample i always
starts from the same noise and label (callbacks.fid's per-index seeds), so every run, sampler and budget is
scored on identical starting points.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.common import CountingNet
# The evaluation engine's per-index noise, quantisation, Fréchet distance and digits features.
from callbacks.features import DigitsFeatures
from callbacks.fid import chunk_bounds, mix_seed, noise_and_labels
from callbacks.fid_stats import frechet_distance, quantize

NFE_PER_STEP = {"heun": 2}  # every other fixed-step sampler calls the network once per step


# ---- image metrics -----------------------------------------------------------------------------------------
def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x . y / d + 1)^3 (Binkowski et al. 2018) -> [len(a), len(b)]."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid(gen: np.ndarray, ref: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets [n, d] and [m, d]: off-diagonal means within each set, full mean across."""
    n, m = len(gen), len(ref)
    kxx, kyy = polynomial_kernel(gen, gen), polynomial_kernel(ref, ref)
    within = (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * polynomial_kernel(gen, ref).mean())


@dataclass
class Reference:
    """The real side of every image metric: features of the digits train split (the FID reference set)."""

    features: np.ndarray  # [M, d] float64
    mu: np.ndarray
    sigma: np.ndarray
    kyy_term: float       # off-diagonal mean of k(ref, ref), shared by every KID

    @classmethod
    def from_features(cls, features: np.ndarray) -> Reference:
        f = np.asarray(features, np.float64)
        kyy = polynomial_kernel(f, f)
        m = len(f)
        return cls(f, f.mean(0), np.cov(f, rowvar=False), float((kyy.sum() - np.trace(kyy)) / (m * (m - 1))))


def image_metrics(features: np.ndarray, correct: np.ndarray, ref: Reference, bootstrap: int, seed: int) -> dict:
    """digits-FID, digits-KID and class accuracy of one sample set, and their spread over `bootstrap`
    resamples of the samples (the sampling noise of each number; FID's bias is not removed)."""
    f = np.asarray(features, np.float64)
    n = len(f)
    kxx = polynomial_kernel(f, f)
    kxy_rows = polynomial_kernel(f, ref.features).mean(1)  # [n]

    def scores(idx: np.ndarray) -> tuple[float, float, float]:
        g = f[idx]
        sub = kxx[np.ix_(idx, idx)]
        kid_value = (sub.sum() - np.trace(sub)) / (n * (n - 1)) + ref.kyy_term - 2.0 * kxy_rows[idx].mean()
        fid_value = frechet_distance(g.mean(0), np.cov(g, rowvar=False), ref.mu, ref.sigma)
        return fid_value, float(kid_value), float(correct[idx].mean())

    fid_value, kid_value, acc = scores(np.arange(n))
    out = {"fid": fid_value, "kid": kid_value, "class_accuracy": acc, "num_samples": n, "bootstrap": bootstrap}
    if bootstrap > 1:
        rng = np.random.default_rng(seed)
        boot = np.array([scores(rng.integers(0, n, n)) for _ in range(bootstrap)])
        out.update(fid_boot_sd=float(boot[:, 0].std(ddof=1)), kid_boot_sd=float(boot[:, 1].std(ddof=1)),
                   class_accuracy_boot_sd=float(boot[:, 2].std(ddof=1)))
    return out


class DigitsMetric:
    """The digits CNN and the train-split reference features, built once per process."""

    def __init__(self, datamodule):
        self.extractor = DigitsFeatures(image_size=datamodule.image_size, val_fraction=datamodule.val_fraction,
                                        split_seed=datamodule.seed, verbose=False).eval()
        datamodule.setup("fit")
        x, _ = datamodule.train_set.tensors
        self.reference = Reference.from_features(self.features(quantize(datamodule.decode(x)))[0])
        self.name = self.extractor.name

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Features [B, d] (float64) and predicted classes [B] of uint8 images."""
        feats, logits = self.extractor(images)
        return feats.double().numpy(), logits.argmax(1).numpy()


# ---- sampling ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """One way to sample: a sampler at an NFE budget on a time grid. sampler=None is the objective's own
    configured default (sampler and steps as it ships), labelled as such in every report."""

    sampler: str | None
    nfe: int | None = None
    time_grid: str | None = None  # None: the objective's configured grid

    @property
    def key(self) -> str:
        if self.sampler is None:
            return "own_default"
        return f"{self.sampler}@{self.nfe}" + (f"/{self.time_grid}" if self.time_grid else "")

    def num_steps(self) -> int | None:
        return None if self.nfe is None else max(1, self.nfe // NFE_PER_STEP.get(self.sampler, 1))

    def attributes(self) -> dict:
        return {} if self.time_grid is None else {"time_grid": self.time_grid}


@contextlib.contextmanager
def objective_settings(objective, **attrs):
    """Set sampler/likelihood keys on an objective for a block and restore them; unknown keys fail loudly."""
    missing = [k for k in attrs if not hasattr(objective, k)]
    if missing:
        raise AttributeError(f"{type(objective).__name__} has no keys {missing}")
    saved = {k: getattr(objective, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(objective, k, v)
        yield objective
    finally:
        for k, v in saved.items():
            setattr(objective, k, v)


@torch.no_grad()
def sample_and_score(module, datamodule, metric: DigitsMetric, spec: SamplerSpec, *, num_samples: int,
                     batch_size: int, seed: int, bootstrap: int, keep: int = 0) -> dict:
    """num_samples samples with one sampler setting -> metrics, NFE per sample, CPU seconds (and `keep` images)."""
    objective = module.objective
    counter = CountingNet(module.ema_net())
    shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)
    chunks = chunk_bounds(num_samples, batch_size)
    feats, correct, kept = [], [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with objective_settings(objective, **spec.attributes()):
        for start, end in chunks:
            noise, labels = noise_and_labels(start, end, shape, datamodule.num_classes, seed)
            gen = torch.Generator().manual_seed(mix_seed(seed, start, stream=1))
            x = objective.sample(counter, noise, labels, sampler=spec.sampler, num_steps=spec.num_steps(),
                                 generator=gen)
            images = quantize(datamodule.decode(x))
            f, predicted = metric.features(images)
            feats.append(f)
            correct.append(predicted == labels.numpy())
            if sum(len(k[0]) for k in kept) < keep:
                kept.append((images, labels))
    out = image_metrics(np.concatenate(feats), np.concatenate(correct), metric.reference, bootstrap, seed)
    out.update(spec=asdict(spec), key=spec.key, sampler=spec.sampler or objective.default_sampler,
               num_steps=spec.num_steps() or objective.default_num_steps,
               nfe=counter.calls / len(chunks), cpu_seconds=time.process_time() - cpu0,
               wall_seconds=time.perf_counter() - wall0)
    if keep:
        out["_images"] = torch.cat([k[0] for k in kept])[:keep]
        out["_labels"] = torch.cat([k[1] for k in kept])[:keep]
    return out


# ---- likelihoods ----------------------------------------------------------------------------------------------
def dequantize(x0: torch.Tensor, bin_width: float, seed: int) -> torch.Tensor:
    """x0 + u * bin_width, u ~ U(-1/2, 1/2) per dimension: a point drawn uniformly from each value's bin."""
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=x0.dtype) - 0.5
    return x0 + bin_width * u


def discrete_bits_per_dim(nats: torch.Tensor, dims: int, bin_width: float) -> torch.Tensor:
    """-log2 P(bin) per dimension bounded through the dequantised density: -(log p(x + u) + D log w) / (D ln 2).

    Comparable with published discrete bits/dim; >= 0 for any model (a bin's probability is at most 1)."""
    return -(nats + dims * math.log(bin_width)) / (dims * math.log(2.0))


def log_likelihood(objective, net, x: torch.Tensor, y: torch.Tensor, *, solver: str, num_steps: int | None,
                   seed: int) -> torch.Tensor:
    """log p(x) [B] in nats through each objective's PF-ODE (exact divergence) with the given solver."""
    keys = {"likelihood_solver": solver}
    if hasattr(objective, "likelihood"):  # diffusion: its PF-ODE density rather than the ELBO
        keys["likelihood"] = "ode"
    with objective_settings(objective, **keys):
        return objective.log_likelihood(net, x, y, exact_divergence=True, num_steps=num_steps,
                                        generator=torch.Generator().manual_seed(seed))


def likelihoods(module, x0: torch.Tensor, y: torch.Tensor, *, bin_width: float, fixed_steps: tuple[int, ...],
                fixed_solver: str, seed: int) -> dict:
    """Dequantised discrete bits/dim on held-out images: dopri5 (the objective's atol/rtol) and, beside it, a
    fixed-step solver at each of fixed_steps on the same points; diffusion adds its ELBO (continuous, as trained,
    and on the dequantised points as a discrete bound)."""
    objective, net = module.objective, module.ema_net()
    D = x0[0].numel()
    xd = dequantize(x0, bin_width, seed)
    out = {"num_images": len(x0), "bin_width": bin_width, "dims": D, "atol": getattr(objective, "atol", None),
           "rtol": getattr(objective, "rtol", None), "fixed_solver": fixed_solver}

    def measure(solver: str, steps: int | None) -> dict:
        cpu0 = time.process_time()
        counter = CountingNet(net)
        bpd = discrete_bits_per_dim(log_likelihood(objective, counter, xd, y, solver=solver, num_steps=steps,
                                                   seed=seed), D, bin_width)
        return {"bpd": float(bpd.mean()), "bpd_sem": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
                "nfe": counter.calls, "cpu_seconds": time.process_time() - cpu0}

    out["dopri5"] = measure("dopri5", None)
    out["fixed"] = {str(n): measure(fixed_solver, n) for n in fixed_steps}
    if hasattr(objective, "likelihood"):
        with objective_settings(objective, likelihood="elbo"):
            gen = torch.Generator().manual_seed(seed)
            out["elbo_bpd"] = float(objective.bits_per_dim(objective.log_likelihood(net, x0, y, generator=gen),
                                                           x0).mean())
            gen = torch.Generator().manual_seed(seed)
            nats = objective.log_likelihood(net, xd, y, generator=gen)
            out["elbo_discrete_bpd"] = float(discrete_bits_per_dim(nats, D, bin_width).mean())
    return out


# ---- one evaluation task (runs in a worker process) -----------------------------------------------------------
_METRICS: dict = {}


def digits_metric(datamodule) -> DigitsMetric:
    """This process's DigitsMetric for the datamodule's split (built once: the CNN is cached on disk)."""
    key = (datamodule.image_size, datamodule.val_fraction, datamodule.seed)
    if key not in _METRICS:
        _METRICS[key] = DigitsMetric(datamodule)
    return _METRICS[key]


def heldout(datamodule, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of the validation split (the same for every run)."""
    datamodule.setup("fit")
    x, y = datamodule.val_set.tensors
    return x[:n].clone(), y[:n].clone()


def real_image_metrics(datamodule, bootstrap: int, seed: int = 0) -> dict:
    """The held-out real images scored like samples: what a perfect model would reach at that sample count."""
    metric = digits_metric(datamodule)
    x, y = heldout(datamodule, None)
    feats, predicted = metric.features(quantize(datamodule.decode(x)))
    return image_metrics(feats, predicted == y.numpy(), metric.reference, bootstrap, seed)


def evaluate_task(task: dict) -> dict:
    """One evaluation of one checkpoint: task['kind'] 'sample' (a SamplerSpec's sample set) or 'likelihood'."""
    from benchmarks.sampling import load_module

    module, datamodule = load_module(task["ckpt"], torch.device("cpu"))
    if task["kind"] == "sample":
        out = sample_and_score(module, datamodule, digits_metric(datamodule), SamplerSpec(**task["spec"]),
                               num_samples=task["num_samples"], batch_size=task["batch_size"], seed=task["seed"],
                               bootstrap=task["bootstrap"], keep=task.get("keep", 0))
    else:
        x0, y = heldout(datamodule, task["nll_images"])
        out = likelihoods(module, x0, y, bin_width=task["bin_width"], fixed_steps=tuple(task["fixed_steps"]),
                          fixed_solver=task["fixed_solver"], seed=task["seed"])
    return {**{k: v for k, v in task.items() if k in ("ckpt", "run_id", "budget", "kind")}, **out}
