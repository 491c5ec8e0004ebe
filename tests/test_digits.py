"""The embedded default data: shapes, range, labels, deterministic split."""

import numpy as np
import pytest
import torch

from datamodules.digits import DigitsDataModule, load_digits_tensors
from workflow.data_order import ResumableSampler


@pytest.mark.parametrize("size", [8, 16])
def test_batches_shape_range_labels(size):
    dm = DigitsDataModule(image_size=size, batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, size, size) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.long
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(y.tolist()) <= set(range(10))
    # the images really span the range (0 -> -1 background, 16 -> +1 ink)
    full, labels = load_digits_tensors(size)
    assert full.shape[0] == 1797 and full.min() == -1.0 and full.max() > 0.9
    assert torch.bincount(labels).tolist() == np.bincount(labels.numpy()).tolist()
    assert len(torch.unique(labels)) == 10


def test_split_is_deterministic_and_disjoint():
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=3)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    n_train, n_val = len(a.train_set), len(a.val_set)
    assert n_train + n_val == 1797 and n_val == round(0.1 * 1797)
    c = DigitsDataModule(seed=4)
    c.setup()
    assert not torch.equal(a.val_set.tensors[1], c.val_set.tensors[1])
    # no val image appears in train
    tr = {tuple(r) for r in a.train_set.tensors[0].flatten(1).tolist()}
    dup = sum(tuple(r) in tr for r in a.val_set.tensors[0].flatten(1).tolist())
    assert dup < 5  # a handful of digits are pixel-identical duplicates in the source data


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="data.image_size"):
        DigitsDataModule(image_size=12)
    with pytest.raises(ValueError, match="data.channels"):
        DigitsDataModule(channels=3)
    dm = DigitsDataModule()
    assert torch.equal(dm.decode(torch.tensor([2.0, -3.0, 0.5])), torch.tensor([1.0, -1.0, 0.5]))


def test_training_order_is_seeded_resumable_and_split_over_ranks():
    """The order is a function of shuffle_seed (not the global RNG); a loader restored from another's state after 3
    batches yields that loader's 4th batch; two ranks get disjoint halves of each pass."""
    dm = DigitsDataModule(image_size=8, batch_size=64, shuffle_seed=7)
    dm.setup()
    first = dm.train_dataloader()
    torch.manual_seed(123)  # the global RNG does not matter
    batches = [y for _, y in first]
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(batches, [y for _, y in dm.train_dataloader()]))
    assert len(batches) == 1617 // 64

    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "consumed": 3 * 64, "seed": 7}  # the second pass over the data
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[1], next(it)[1])
    assert len(list(resumed)) == len(batches)  # the pass after the resumed one is whole again

    shares = [set(ResumableSampler(dm.train_set, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 1617 - 1617 % 2
