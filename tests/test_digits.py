"""The embedded default data: shapes, range, labels, deterministic split."""

import numpy as np
import pytest
import torch

from datamodules.digits import DigitsDataModule, load_digits_tensors


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
