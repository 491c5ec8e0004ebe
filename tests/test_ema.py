"""EMA: the update rule, start step and warmup, fp32 shadow, state_dict keys, multi-tensor ops."""

import pytest
import torch
from torch import nn

from gen_objectives.ema import EMA


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)  # float buffers + an integer buffer (num_batches_tracked)


def perturb(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        net.norm.running_mean.add_(1.0)
        net.norm.num_batches_tracked += 3


def test_update_matches_the_formula_and_copies_integer_buffers():
    torch.manual_seed(0)
    net = Net()
    ema = EMA(net, decay=0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    perturb(net, 1)
    ema.update(net, step=5)
    after = ema.state_dict()
    for key, value in net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * value, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(after[key], value), key


def test_start_step_copies_and_warmup_ramps():
    ema = EMA(Net(), decay=0.9999, start_step=10, warmup=True)
    assert ema.decay_at(0) == 0.0 and ema.decay_at(9) == 0.0
    assert ema.decay_at(10) == pytest.approx(1 / 10)
    assert ema.decay_at(10 + 90) == pytest.approx(91 / 100)
    assert ema.decay_at(10**7) == 0.9999
    assert EMA(Net(), decay=0.99).decay_at(0) == 0.99
    net = Net()
    ema = EMA(net, decay=0.5, start_step=3)
    perturb(net, 2)
    ema.update(net, step=1)
    for key, value in net.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value.float() if value.is_floating_point() else value)


def test_shadow_stays_fp32_when_the_net_is_bf16():
    net = Net().to(torch.bfloat16)
    ema = EMA(net, decay=0.5)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    perturb(net, 3)
    ema.update(net, step=0)
    assert ema.net.lin.weight.dtype == torch.float32
    assert not ema.net.lin.weight.requires_grad


def test_state_dict_has_the_network_keys_and_round_trips():
    net = Net()
    ema = EMA(net, decay=0.9)
    perturb(net, 4)
    ema.update(net, step=0)
    state = ema.state_dict()
    assert state.keys() == net.state_dict().keys()
    fresh = EMA(Net(), decay=0.9)
    fresh.load_state_dict(state)
    for key in state:
        assert torch.equal(fresh.state_dict()[key], state[key])
    Net().load_state_dict(state)  # loads into a plain network, like an official DiT 'ema' entry


def test_one_multi_tensor_call_per_update(monkeypatch):
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: (calls.append(len(a[0])), real(*a, **k)))
    net = Net()
    ema = EMA(net, decay=0.9)
    ema.update(net, step=0)
    ema.update(net, step=1)
    assert calls == [len([v for v in net.state_dict().values() if v.is_floating_point()])] * 2


def test_bad_decay_fails():
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(Net(), decay=1.0)
