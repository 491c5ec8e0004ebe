"""What one trained checkpoint scores on digits: per sampler, digits-FID, KID and class accuracy of a sample set
with their bootstrap spreads; the converged NLL (dopri5, exact divergence) in dequantised discrete bits/dim, with
fixed-step solvers beside it; diffusion's ELBO.

digits-FID / digits-KID use the penultimate features of a small digits CNN (NOT Inception). Sample i always
starts from the same noise and label (evaluation.samples: per-index seeds), so every run, sampler and budget is
scored on identical starting points.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from benchmarks.common import CountingNet

# The evaluation engine's per-index noise, quantisation, Fréchet distance, KID kernel and digits features.
from evaluation.features import DigitsFeatures
from evaluation.kid import cubic_kernel as polynomial_kernel  # (a.b / d + 1)^3; works on numpy arrays too
from evaluation.samples import chunk_bounds, mix_seed, noise_and_labels
from evaluation.stats import frechet_distance, quantize

NFE_PER_STEP = {"heun": 2}  # every other fixed-step sampler calls the network once per step


# ---- image metrics -----------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The real side of every image metric: features of the digits train split (the FID reference set).

    KID sees every feature times kid_scale, one constant that gives the reference unit mean square per
    dimension: the digits CNN's raw features (mean square ~17) would put the cubic kernel near 10^4.
    """

    features: np.ndarray  # [M, d] float64, raw
    mu: np.ndarray
    sigma: np.ndarray
    kid_scale: float
    kyy_term: float       # off-diagonal mean of k(ref, ref) on scaled features, shared by every KID

    @classmethod
    def from_features(cls, features: np.ndarray) -> Reference:
        f = np.asarray(features, np.float64)
        scale = float(1.0 / np.sqrt((f**2).mean()))
        kyy = polynomial_kernel(scale * f, scale * f)
        m = len(f)
        return cls(f, f.mean(0), np.cov(f, rowvar=False), scale,
                   float((kyy.sum() - np.trace(kyy)) / (m * (m - 1))))


def image_metrics(features: np.ndarray, correct: np.ndarray, ref: Reference, bootstrap: int, seed: int) -> dict:
    """digits-FID, digits-KID and class accuracy of one sample set, and their spread over `bootstrap`
    resamples of the samples (the sampling noise of each number; FID's bias is not removed)."""
    f = np.asarray(features, np.float64)
    n = len(f)
    fs = ref.kid_scale * f
    kxx = polynomial_kernel(fs, fs)
    kxy_rows = polynomial_kernel(fs, ref.kid_scale * ref.features).mean(1)  # [n]

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
        out = self.extractor(images)  # {"pool": [B, d], "logits": [B, classes]}
        return out["pool"].double().numpy(), out["logits"].argmax(1).numpy()


# ---- sampling ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """One way to sample: a sampler at an NFE budget, with the objective keys that must match across objectives
    (time grid; the reverse SDE's w(t)). sampler=None is the objective's own configured default (sampler and
    steps as it ships), labelled as such in every report."""

    sampler: str | None
    nfe: int | None = None
    time_grid: str | None = None      # None: the objective's configured grid
    sde_diffusion: str | None = None  # None: the objective's configured w(t)

    @property
    def key(self) -> str:
        if self.sampler is None:
            return "own_default"
        return "/".join([f"{self.sampler}@{self.nfe}", *(f"{k}={v}" for k, v in self.keys().items())])

    def num_steps(self) -> int | None:
        return None if self.nfe is None else max(1, self.nfe // NFE_PER_STEP.get(self.sampler, 1))

    def keys(self) -> dict:
        return {k: v for k, v in (("time_grid", self.time_grid), ("sde_diffusion", self.sde_diffusion)) if v}


def objective_with(module, **keys):
    """The checkpoint's objective rebuilt from its stored config with some keys changed (objectives hold no
    weights, so this is exact); the module's own objective when nothing changes."""
    if not keys:
        return module.objective
    from workflow.config_guard import instantiate_trusted  # the config came from a file: project targets only

    return instantiate_trusted({**module.hparams["cfg"]["objective"], **keys}, "checkpoint: objective")


@torch.no_grad()
def sample_and_score(module, datamodule, metric: DigitsMetric, spec: SamplerSpec, *, num_samples: int,
                     batch_size: int, seed: int, bootstrap: int, keep: int = 0) -> dict:
    """num_samples samples with one sampler setting -> metrics, NFE per sample, CPU seconds (and `keep` images)."""
    objective = objective_with(module, **spec.keys())
    counter = CountingNet(module.ema_net())
    shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)
    chunks = chunk_bounds(num_samples, batch_size)
    feats, correct, kept = [], [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
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
def likelihoods(module, x0: torch.Tensor, y: torch.Tensor, *, bin_width: float, fixed_steps: tuple[int, ...],
                fixed_solver: str, seed: int) -> dict:
    """Discrete bits/dim of held-out images, uniformly dequantised over their bins (objective.discrete_bits_per_dim):
    the PF-ODE by dopri5 (the objective's atol = rtol) with the exact divergence, and a fixed-step solver at each
    of fixed_steps on the same dequantised points; diffusion adds its ELBO (continuous, and dequantised)."""
    cfg = module.hparams["cfg"]["objective"]
    is_diffusion = "likelihood" in cfg  # diffusion: ELBO by default, its PF-ODE density with likelihood=ode
    objective = objective_with(module, **({"likelihood": "ode"} if is_diffusion else {}))
    net = module.ema_net()
    out = {"num_images": len(x0), "bin_width": bin_width, "dims": x0[0].numel(), "atol": objective.atol,
           "rtol": objective.rtol, "fixed_solver": fixed_solver}

    def measure(solver: str, steps: int | None) -> dict:
        cpu0 = time.process_time()
        counter = CountingNet(net)
        gen = torch.Generator().manual_seed(seed)  # the same dequantisation for every solver
        bpd = objective.discrete_bits_per_dim(counter, x0, y, bin_width=bin_width, generator=gen,
                                              exact_divergence=True, num_steps=steps, solver=solver)
        return {"bpd": float(bpd.mean()), "bpd_sem": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
                "nfe": counter.calls, "cpu_seconds": time.process_time() - cpu0}

    out["dopri5"] = measure("dopri5", None)
    out["fixed"] = {str(n): measure(fixed_solver, n) for n in fixed_steps}
    if is_diffusion:
        elbo = objective_with(module, likelihood="elbo")
        gen = torch.Generator().manual_seed(seed)
        out["elbo_bpd"] = float(elbo.bits_per_dim(elbo.log_likelihood(net, x0, y, generator=gen), x0).mean())
        gen = torch.Generator().manual_seed(seed)
        out["elbo_discrete_bpd"] = float(elbo.discrete_bits_per_dim(net, x0, y, bin_width=bin_width,
                                                                     generator=gen).mean())
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
