"""The factorial grid (issue #10 item 6): every objective accepts every factor key, each factor means one thing.

prediction x weighting: a weighting is one w(t) on the eps-MSE whatever the network predicts; time sampling;
learned variance for any objective (its VLB on the path equals DiT's table VLB at the knots); invalid
combinations fail at construction naming the key; the three corners keep their exact losses.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from oracles import NUM_CLASSES, ContinuousOracle, DiffusionOracle, gaussian_problem, single_thread
from scipy import stats

from gen_objectives.conversions import eps_from_score, eps_from_velocity, eps_from_x0
from gen_objectives.objectives import DiffusionObjective, FlowObjective, ScoreObjective
from gen_objectives.vlb import Decoder, path_vlb_bits

pytestmark = pytest.mark.usefixtures("single_thread")
assert single_thread  # imported so pytest finds the fixture in this module

FACTORS = {"prediction", "weighting", "min_snr_gamma", "time_sampling", "logit_normal_mean", "logit_normal_std",
           "importance_sampling", "path", "learn_sigma", "vlb_weight", "num_timesteps", "t_min", "t_max"}
SAMPLER_KEYS = {"sampler", "num_steps", "time_grid", "grid_rho", "denoise_final", "t_end", "eta", "sde_diffusion",
                "sde_diffusion_norm", "corrector_steps", "snr", "atol", "rtol", "likelihood_solver",
                "likelihood_num_steps", "likelihood_exact_max_dim", "bin_width", "decoder_cdf"}
CORNERS = {  # prediction, weighting, time_sampling, path, learn_sigma
    DiffusionObjective: ("eps", "sigma2", "discrete", "vp", True),
    ScoreObjective: ("eps", "sigma2", "uniform", "vp", False),
    FlowObjective: ("velocity", "velocity", "uniform", "vp", False),
}


@pytest.mark.parametrize("cls", list(CORNERS))
def test_every_objective_accepts_every_key_with_its_corner_as_default(cls):
    params = inspect.signature(cls.__init__).parameters
    assert FACTORS | SAMPLER_KEYS <= set(params)
    defaults = tuple(params[k].default for k in ("prediction", "weighting", "time_sampling", "path", "learn_sigma"))
    assert defaults == CORNERS[cls]
    obj = cls(num_classes=NUM_CLASSES)
    assert (obj.prediction.name, obj.weighting.name, obj.time_sampling, obj.path.name, obj.learn_sigma) == defaults


def vp_eps_weight(weighting: str, t: torch.Tensor, path) -> torch.Tensor:
    """w(t) on the eps-MSE, written out for vp: 1, beta / sigma^2, (beta / (2 sigma))^2, min(SNR, 5) / SNR."""
    beta, a, s = path.beta(t), path.alpha(t), path.sigma(t)
    snr = a**2 / s**2
    return {"sigma2": torch.ones_like(t), "likelihood": beta / s**2, "velocity": (beta / (2 * s)) ** 2,
            "min_snr": snr.clamp(max=5.0) / snr}[weighting]


@pytest.mark.parametrize("prediction", ["eps", "velocity", "x0", "score"])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood", "velocity", "min_snr"])
def test_a_weighting_is_one_function_of_t_on_the_eps_mse_whatever_the_prediction(prediction, weighting):
    data, y, noise = gaussian_problem(256)
    x0 = data.sample(y, torch.Generator().manual_seed(1))
    obj = ScoreObjective(num_classes=NUM_CLASSES, prediction=prediction, weighting=weighting)
    net = ContinuousOracle(data, obj.path, prediction, perturb=0.1)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64).repeat_interleave(len(y) // 3 + 1)[: len(y)]
    loss = obj.loss(net, x0, y, t=t, noise=noise)
    c = obj.path.coefs(t, x0.ndim)
    x_t = c.alpha * x0 + c.sigma * noise
    out = net(x_t, 1000 * t, y)
    eps_hat = {"eps": lambda: out, "velocity": lambda: eps_from_velocity(x_t, out, c),
               "x0": lambda: eps_from_x0(x_t, out, c), "score": lambda: eps_from_score(out, c)}[prediction]()
    expected = vp_eps_weight(weighting, t, obj.path) * ((eps_hat - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_the_three_corners_keep_their_exact_losses():
    data, y, noise = gaussian_problem(64)
    x0 = data.sample(y, torch.Generator().manual_seed(2)).float()
    noise = noise.float()
    t = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    flow = FlowObjective(num_classes=NUM_CLASSES)
    net = ContinuousOracle(data, flow.path, "velocity", perturb=0.1)
    c = flow.path.coefs(t, 4)
    out = net(c.alpha * x0 + c.sigma * noise, 1000 * t, y)
    assert torch.equal(flow.loss(net, x0, y, t=t, noise=noise),
                       ((out - (c.d_alpha * x0 + c.d_sigma * noise)) ** 2).flatten(1).mean(1))
    score = ScoreObjective(num_classes=NUM_CLASSES)
    net = ContinuousOracle(data, score.path, "eps", perturb=0.1)
    out = net(c.alpha * x0 + c.sigma * noise, 1000 * t, y)
    assert torch.equal(score.loss(net, x0, y, t=t, noise=noise), ((out - noise) ** 2).flatten(1).mean(1))
    diffusion = DiffusionObjective(num_classes=NUM_CLASSES)
    net = DiffusionOracle(data, diffusion.schedule, True, perturb_eps=0.1, perturb_v=0.2)
    i = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(4))
    terms = diffusion.loss_terms(net, x0, y, t=i, noise=noise)
    ac = diffusion.schedule.alphas_cumprod[i].float()[:, None, None, None]
    out = net(ac.sqrt() * x0 + (1 - ac).sqrt() * noise, i.float(), y)
    assert torch.equal(terms["mse"], ((noise - out[:, :2]) ** 2).flatten(1).mean(1))
    assert torch.equal(diffusion.loss(net, x0, y, t=i, noise=noise), terms["mse"] + terms["vb"])


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    score = ScoreObjective(num_classes=NUM_CLASSES, time_sampling="discrete")
    t = score.sample_t(20000, "cpu", generator=g)
    i = t * 1000 - 1
    assert t.is_floating_point() and torch.allclose(i, i.round(), atol=1e-3) and i.round().min() == 0
    assert i.round().max() == 999
    diffusion = DiffusionObjective(num_classes=NUM_CLASSES, time_sampling="logit_normal", logit_normal_mean=0.5,
                                   logit_normal_std=0.8)
    t = diffusion.sample_t(20000, "cpu", generator=g)
    assert t.is_floating_point() and t.min() >= diffusion.t_min and t.max() <= diffusion.t_max
    logit = torch.logit((t.double() - diffusion.t_min) / (diffusion.t_max - diffusion.t_min))
    assert stats.kstest(logit.numpy(), "norm", args=(0.5, 0.8)).pvalue > 1e-3
    # diffusion on continuous t: the net sees the fractional step index T t - 1
    assert torch.allclose(diffusion.t_net(torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)),
                          torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))
    assert torch.equal(diffusion.unit_time(t), t)


def test_learned_variance_on_the_path_is_dits_table_vlb_at_the_knots():
    """The VLB term of any objective (step 1/T along its path) equals DiT's L_i on the DiscreteVPPath knots."""
    data, y, noise = gaussian_problem(60)
    x0 = data.sample(y, torch.Generator().manual_seed(5)).clamp(-0.99, 0.99)
    obj = DiffusionObjective(num_classes=NUM_CLASSES)
    i = torch.tensor([0, 1, 2, 100, 500, 999]).repeat(10)
    x_t = obj.q_sample(x0, i, noise)
    eps_hat = noise + 0.05 * torch.randn(noise.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    v = torch.rand(noise.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    table = obj.vlb_term(obj.schedule, eps_hat, v, x0, x_t, i, decoder="discretized")
    t = (i.double() + 1) / 1000
    x0_hat = obj.predict_x0(obj.schedule, x_t, eps_hat, i)
    path = path_vlb_bits(obj.path, t, 1e-3, x0, x_t, x0_hat, v, Decoder(True, obj.bin_width))
    torch.testing.assert_close(path, table, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cls,prediction", [(ScoreObjective, "eps"), (FlowObjective, "velocity")])
def test_any_objective_can_switch_learned_variance_on(cls, prediction):
    data, y, noise = gaussian_problem(64)
    x0 = data.sample(y, torch.Generator().manual_seed(8))
    obj = cls(num_classes=NUM_CLASSES, learn_sigma=True)
    assert obj.output_channels(2) == (4,)
    base = ContinuousOracle(data, obj.path, prediction)
    v = torch.zeros(64, 2, 1, 1, dtype=torch.float64, requires_grad=True)

    def net(x, t_net, yy):
        return torch.cat([base(x, t_net, yy), v * 1.0], dim=1)

    t = torch.full((64,), 0.3, dtype=torch.float64)
    terms = obj.loss_terms(net, x0, y, t=t, noise=noise)
    assert terms["vb"].shape == (64,) and torch.isfinite(terms["vb"]).all() and terms["vb"].mean() > 0
    (grad,) = torch.autograd.grad(terms["vb"].sum(), v)
    assert grad.abs().max() > 0  # the VLB trains the variance channels
    plain = cls(num_classes=NUM_CLASSES).loss(base, x0, y, t=t, noise=noise)
    torch.testing.assert_close(obj.loss(net, x0, y, t=t, noise=noise), plain + terms["vb"])
    with pytest.raises(ValueError, match=r"C' in \(4,\)"):
        obj.loss(base, x0, y, t=t, noise=noise)  # a C-channel net has no variance channels


@pytest.mark.parametrize("kwargs,message", [
    (dict(cls=DiffusionObjective, path="linear"), "path='linear' with objective=diffusion.*valid choices: vp"),
    (dict(cls=ScoreObjective, importance_sampling=True), "importance_sampling=true needs weighting=likelihood"),
    (dict(cls=FlowObjective, path="linear", weighting="likelihood", prediction="velocity", importance_sampling=True),
     "importance_sampling needs a finite log-SNR"),
    (dict(cls=ScoreObjective, weighting="min_snr", min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
    (dict(cls=ScoreObjective, time_sampling="logit_normal", logit_normal_std=0.0), "logit_normal_std must be > 0"),
    (dict(cls=ScoreObjective, time_sampling="beta"), "time_sampling 'beta'; valid choices: discrete, logit_normal"),
    (dict(cls=FlowObjective, path="linear", prediction="eps"),
     "prediction=eps with weighting=velocity on path=linear has an infinite loss weight or target at t=1"),
    (dict(cls=FlowObjective, path="linear", time_grid="log_snr"), "time_grid=log_snr needs a finite log-SNR"),
    (dict(cls=FlowObjective, decoder_cdf="erf"), "decoder_cdf 'erf'; valid choices: dit_tanh, exact"),
])
def test_invalid_combinations_fail_at_construction_naming_the_key(kwargs, message):
    kwargs = dict(kwargs)
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=message):
        cls(num_classes=NUM_CLASSES, **kwargs)
