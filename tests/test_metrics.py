"""sFID, precision/recall, KID, the FID bootstrap and balanced labels against independent implementations
(torch-fidelity's own precision/recall and MMD code, scipy's sqrtm Frechet distance, numpy written out)."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_kid import mmd2
from torch_fidelity.metric_prc import calculate_precision_recall_full

from evaluation.kid import cubic_kernel, kid
from evaluation.manifold import knn_radii, precision_recall
from evaluation.metrics import MetricAccumulator
from evaluation.reference import Reference, get_reference
from evaluation.samples import noise_and_labels
from evaluation.stats import bootstrap_frechet_std, frechet_distance


def features(n, d, seed, shift=0.0, scale=1.0):
    """n draws of one correlated Gaussian in d dimensions (shifted/scaled), the draws set by seed."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / d ** 0.5
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x @ a) * scale + shift


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)  # ADM's evaluator's form
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


class ProjectionInception(torch.nn.Module):
    """A small real extractor in Inception's role: pool, spatial and logits from fixed random projections."""

    name = "inception-v3-compat"
    dims = {"pool": 8, "spatial": 12}
    fd_names = {"pool": "fid", "spatial": "sfid"}
    prefix = ""
    num_logits = 5
    logits_are_data_classes = False
    note = None

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.p = torch.randn(48, 8, generator=g)
        self.s = torch.randn(48, 12, generator=g)
        self.w = torch.randn(8, 5, generator=g)

    def forward(self, images):
        x = images.float().flatten(1) / 255.0
        pool = torch.tanh(x @ self.p)
        return {"pool": pool, "spatial": torch.nn.functional.softplus(x @ self.s - 6.0), "logits": pool @ self.w}


def test_sfid_and_adm_reference_batch_against_scipy(tmp_path):
    """ADM's .npz: FID from mu/sigma, sFID from mu_s/sigma_s, precision/recall and KID from arr_0's features."""
    ext = ProjectionInception()
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (300, 4, 4, 3), dtype=torch.uint8, generator=g)
    fake = (torch.randint(0, 200, (250, 3, 4, 4), dtype=torch.uint8, generator=g) + 20).to(torch.uint8)
    rf = ext(real.permute(0, 3, 1, 2))
    np.savez(tmp_path / "VIRTUAL_test.npz", arr_0=real.numpy(),
             mu=rf["pool"].double().mean(0).numpy(), sigma=np.cov(rf["pool"].double().numpy(), rowvar=False),
             mu_s=rf["spatial"].double().mean(0).numpy(), sigma_s=np.cov(rf["spatial"].double().numpy(), rowvar=False))
    ref = get_reference(str(tmp_path / "VIRTUAL_test.npz"), ext, None, "cpu", False, rows=1000)
    assert ref.rows.shape == (300, 8) and ref.count == 300
    acc = MetricAccumulator(ext, 250, kid=True, precision_recall=True)
    for i in range(0, 250, 64):  # uneven batches
        acc.update(fake[i:i + 64], torch.zeros(len(fake[i:i + 64])), torch.arange(i, min(i + 64, 250)))
    m = acc.finalize(ref)
    ff = ext(fake)
    for key, name in (("pool", "fid_250"), ("spatial", "sfid_250")):
        x, y = ff[key].double().numpy(), rf[key].double().numpy()
        expected = scipy_frechet(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        assert m[name] > 0.01 and abs(m[name] - expected) < 1e-6 * expected, name
    p, r = calculate_precision_recall_full(ff["pool"].double(), rf["pool"].double(), neighborhood=3)
    assert (m["precision"], m["recall"]) == pytest.approx((p, r), abs=1e-6)  # torch-fidelity: float32 means


def test_precision_recall_equals_torch_fidelity_in_blocks():
    ref, smp = features(300, 16, 2), features(257, 16, 3, shift=0.3, scale=0.9)
    expected = calculate_precision_recall_full(smp, ref, neighborhood=3)  # (generated, real) order
    for block in (10000, 64, 37):  # one block, and blocks that do not divide the sets
        got = precision_recall(ref, smp, k=3, block=block, dtype=torch.float64)
        assert got == pytest.approx(expected, abs=1e-6), block  # the same counts (torch-fidelity: float32 means)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case where both are informative
    # radii: the 3rd nearest other point (the point itself is the 0th), squared
    d = torch.cdist(ref, ref) ** 2
    torch.testing.assert_close(knn_radii(ref, 3, block=50), d.sort(dim=1).values[:, 3])


def test_kid_equals_torch_fidelity_and_numpy():
    x, y = features(120, 10, 4, shift=0.2), features(120, 10, 5)
    kxx, kxy, kyy = (cubic_kernel(a, b).numpy() for a, b in ((x, x), (x, y), (y, y)))
    expected = mmd2(kxx, kxy, kyy)  # torch-fidelity's unbiased estimator (equal sizes)
    got, stderr = kid(x, y, block=50)
    assert got == pytest.approx(expected, rel=1e-10) and stderr > 0
    # unequal sizes: the U-statistic written out in numpy
    x2 = features(90, 10, 6, shift=0.2)
    a, b = x2.numpy(), y.numpy()
    k = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3
    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    direct = ((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
              - 2 * k(a, b).mean())
    assert kid(x2, y, block=32)[0] == pytest.approx(direct, rel=1e-10)


def test_kid_stderr_matches_the_spread_over_independent_sample_sets():
    """The first-order standard error agrees with the empirical spread of KID over 100 independent sets."""
    torch.set_num_threads(1)
    values, errors = [], []
    for s in range(100):
        x, y = features(150, 6, 1000 + s, shift=0.35), features(120, 6, 5000 + s)
        v, e = kid(x, y)
        values.append(v)
        errors.append(e)
    spread = np.std(values, ddof=1)
    assert np.mean(values) > 3 * spread  # the distributions differ: the non-degenerate regime
    assert 0.75 < np.mean(errors) / spread < 1.33


def test_fid_bootstrap_std_matches_the_spread_over_independent_sample_sets():
    ref = features(4000, 4, 7)
    mu_r, s_r = ref.mean(0).numpy(), np.cov(ref.numpy(), rowvar=False)
    fids, boots = [], []
    for s in range(60):
        x = features(300, 4, 9000 + s, shift=0.3)
        xn = x.numpy()
        fids.append(frechet_distance(xn.mean(0), np.cov(xn, rowvar=False), mu_r, s_r))
        if s < 15:
            boots.append(bootstrap_frechet_std(x, mu_r, s_r, replicates=40, seed=s))
    assert 0.7 < np.mean(boots) / np.std(fids, ddof=1) < 1.4
    assert bootstrap_frechet_std(ref[:10], mu_r, s_r, replicates=1) is None


def test_balanced_labels_give_equal_classes_and_the_same_noise():
    n_u, y_u = noise_and_labels(0, 50, (1, 2, 2), 10, seed=3, labels="uniform")
    n_b, y_b = noise_and_labels(0, 50, (1, 2, 2), 10, seed=3, labels="balanced")
    assert torch.equal(n_u, n_b)
    assert torch.bincount(y_b, minlength=10).tolist() == [5] * 10
    assert torch.bincount(y_u, minlength=10).tolist() != [5] * 10  # uniform draws are not balanced
    _, part = noise_and_labels(23, 31, (1, 2, 2), 10, seed=3, labels="balanced")
    assert torch.equal(part, y_b[23:31])  # a label depends on the sample index only
    with pytest.raises(ValueError, match="uniform"):
        noise_and_labels(0, 2, (1, 2, 2), 10, seed=3, labels="stratified")


def test_reference_rows_missing_means_no_precision_recall():
    ext = ProjectionInception()
    acc = MetricAccumulator(ext, 20)
    imgs = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    acc.update(imgs, torch.zeros(20), torch.arange(20))
    f = ext(imgs)["pool"].double()
    ref = Reference({"pool": (f.mean(0).numpy() + 1, np.eye(8))}, None, None, {"extractor": ext.name})
    m = acc.finalize(ref)
    assert "fid_20" in m and "precision" not in m and "kid" not in m and "sfid_20" not in m
