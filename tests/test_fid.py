"""FID/IS arithmetic against float64 references, exact DDP combination (gloo), sample bookkeeping."""

import os
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.digits import DigitsDataModule
from evaluation.metrics import MetricAccumulator, count_suffix
from evaluation.reference import Reference, ReferenceError, get_reference, load_reference, save_reference
from evaluation.samples import chunk_bounds, chunks_for_rank, generate_chunk, noise_and_labels
from evaluation.stats import FeatureStats, InceptionScoreStats, frechet_distance, quantize


def scipy_frechet(mu1, s1, mu2, s2):
    """Eq. (31) literally, with scipy's sqrtm, in float64: the reference the implementation must match."""
    r1 = scipy.linalg.sqrtm(s1)
    inner = scipy.linalg.sqrtm(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(inner).real)


def gaussian_set(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a * scale + shift


def test_stats_match_numpy_cov_float64():
    x = gaussian_set(300, 12, 0, shift=3.0).astype(np.float32)
    st = FeatureStats(12)
    for i in range(0, 300, 77):  # uneven batches
        st.update(torch.from_numpy(x[i:i + 77]))
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.mean(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.cov(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    assert st.count == 300


def test_frechet_matches_scipy_reference_and_self_is_zero():
    d = 16
    a, b = gaussian_set(400, d, 1), gaussian_set(400, d, 2, shift=0.3, scale=1.4)
    mu_a, s_a = a.mean(0), np.cov(a, rowvar=False)
    mu_b, s_b = b.mean(0), np.cov(b, rowvar=False)
    ours, ref = frechet_distance(mu_a, s_a, mu_b, s_b), scipy_frechet(mu_a, s_a, mu_b, s_b)
    assert ours > 0.1
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    assert abs(frechet_distance(mu_a, s_a, mu_a, s_a)) < 1e-9
    # a pure shift with equal covariances costs exactly ||shift||^2
    shifted = frechet_distance(mu_a, s_a, mu_a + 0.5, s_a)
    assert shifted == pytest.approx(0.25 * d, rel=1e-9)


def test_frechet_is_real_for_singular_covariances():
    """Fewer samples than dimensions: sqrtm's complex noise must not reach the result."""
    a, b = gaussian_set(20, 64, 3), gaussian_set(20, 64, 4)
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert np.isfinite(fid) and isinstance(fid, float) and fid > 0
    s = np.cov(a, rowvar=False)
    self_fid = frechet_distance(a.mean(0), s, a.mean(0), s)
    assert abs(self_fid) < 1e-6 * np.trace(s)  # sqrt of rounding-level zero eigenvalues: ~sqrt(eps) each


def adm_style_inception_score(logits, split_size):
    """IS written out directly: softmax, consecutive splits in order, exp(mean KL) averaged."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_splits_in_file_order():
    logits = torch.randn(23, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = adm_style_inception_score(logits, split_size=5)
    st = InceptionScoreStats(23, 9, split_size=5)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    st.update(logits[perm[:11]], perm[:11])  # arrival order must not matter, file order does
    st.update(logits[perm[11:]], perm[11:])
    assert st.score() == pytest.approx(expected, rel=1e-12)
    shuffled = adm_style_inception_score(logits[perm], split_size=5)
    assert abs(shuffled - expected) > 1e-6  # the split assignment by index is what keeps ADM's numbers


class TinyExtractor(torch.nn.Module):
    """Stands for any extractor in the reference checks: a name and feature sizes."""

    def __init__(self, name="digits-cnn-abc", dims=None):
        super().__init__()
        self.name, self.dims = name, dims or {"pool": 5}


def test_reference_roundtrip_and_adm_file(tmp_path):
    from evaluation.reference import check_reference

    x = gaussian_set(50, 5, 5)
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    ident = {"source": "data:X:1", "split": "train", "cap": None, "subset_seed": 0, "extractor": "digits-cnn-abc",
             "rows": 10, "count": 50}
    path = save_reference(tmp_path / "ref.npz", Reference({"pool": (mu, sigma)}, x[:10].astype(np.float32), 50, ident))
    got, images = load_reference(path)
    np.testing.assert_array_equal(got.stats["pool"][0], mu)
    np.testing.assert_array_equal(got.stats["pool"][1], sigma)
    assert got.count == 50 and got.identity == ident and got.rows.shape == (10, 5) and images is None
    assert not list(tmp_path.glob("*.tmp*"))
    check_reference(got, TinyExtractor(), ident, 50)
    with pytest.raises(ReferenceError, match="recompute"):
        check_reference(got, TinyExtractor("inception-v3-compat"), None, None)
    with pytest.raises(ReferenceError, match="cap=None"):
        check_reference(got, TinyExtractor(), {**ident, "cap": 20}, None)
    with pytest.raises(ReferenceError, match="holds statistics of 50 images"):
        check_reference(got, TinyExtractor(), ident, 60)
    # ADM's reference batch: mu/sigma (pool) and mu_s/sigma_s (spatial) plus arr_0 images, no extractor id
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3],
             arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    adm, images = load_reference(tmp_path / "adm.npz")
    assert adm.identity["extractor"] is None and set(adm.stats) == {"pool", "spatial"} and images.shape == (2, 4, 4, 3)
    check_reference(adm, TinyExtractor("inception-v3-compat", {"pool": 5, "spatial": 3}), None, None)
    with pytest.raises(ReferenceError, match="Inception"):
        check_reference(adm, TinyExtractor(), None, None)
    with pytest.raises(ReferenceError, match="mu_s has shape"):
        check_reference(adm, TinyExtractor("inception-v3-compat", {"pool": 5, "spatial": 4}), None, None)
    np.savez(tmp_path / "images_only.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ReferenceError, match="mu"):
        load_reference(tmp_path / "images_only.npz")


def test_quantize_like_dit():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    assert torch.equal(quantize(x), expected)
    assert quantize(x).tolist() == [0, 0, 64, 128, 255, 255, 255]


def test_metric_names():
    assert count_suffix(10000) == "10k" and count_suffix(50000) == "50k" and count_suffix(1234) == "1234"


def test_chunks_are_disjoint_and_cover_all():
    for world in (1, 2, 3):
        seen = [i for r in range(world) for _, s, e in chunks_for_rank(103, 10, r, world) for i in range(s, e)]
        assert sorted(seen) == list(range(103))
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_noise_and_labels_depend_only_on_seed_and_index():
    n_all, y_all = noise_and_labels(0, 12, (1, 4, 4), 10, seed=7)
    n_part, y_part = noise_and_labels(5, 9, (1, 4, 4), 10, seed=7)
    assert torch.equal(n_all[5:9], n_part) and torch.equal(y_all[5:9], y_part)
    n_other, _ = noise_and_labels(0, 12, (1, 4, 4), 10, seed=8)
    assert not torch.allclose(n_all, n_other)
    assert len({tuple(v.flatten().tolist()) for v in n_all}) == 12  # no two samples share noise
    n_shift, _ = noise_and_labels(0, 11, (1, 4, 4), 10, seed=8)
    assert not any(torch.equal(n_all[i + 1], n_shift[i]) for i in range(11))  # seed+1 is not index+1


class LinearFeatures(torch.nn.Module):
    """A fixed random projection of pixels with class logits: a small real extractor for the DDP test."""

    name = "linear-test"
    dims = {"pool": 6}
    fd_names = {"pool": "fid"}
    prefix = ""
    note = None
    num_logits = 4
    logits_are_data_classes = False

    def __init__(self, pixels=16):
        super().__init__()
        self.proj = torch.nn.Linear(pixels, 6)
        self.head = torch.nn.Linear(6, 4)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(1))

    def forward(self, images):
        f = self.proj((images.float() / 255).flatten(1))
        return {"pool": f, "logits": self.head(f)}


def sample_tanh(noise, labels, generator):
    """A stochastic 'sampler' that uses the chunk generator, like SDE samplers do."""
    extra = torch.randn(noise.shape, generator=generator, device=noise.device)
    return torch.tanh(noise + 0.3 * labels.view(-1, 1, 1, 1) - 1.0 + 0.1 * extra)


def run_share(rank, world, num_samples, chunk):
    """One rank's part of an FID run; returns (metrics, the sample indices it generated)."""
    torch.manual_seed(0)
    extractor = LinearFeatures()
    rows = torch.randn(20, 6, generator=torch.Generator().manual_seed(3)).numpy()
    ref = Reference({"pool": (np.zeros(6), np.eye(6))}, rows, 20, {"extractor": "linear-test"})
    acc = MetricAccumulator(extractor, num_samples, is_split_size=7, fid_bootstrap=3)  # several IS splits
    mine = []
    for _, s, e in chunks_for_rank(num_samples, chunk, rank, world):
        images, labels = generate_chunk(sample_tanh, lambda x: x, s, e, (1, 4, 4), 3, seed=11,
                                        device=torch.device("cpu"))
        acc.update(images, labels, torch.arange(s, e))
        mine.extend(range(s, e))
    return acc.finalize(ref), mine


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # first, before any op: a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics, mine = run_share(rank, world, num_samples=37, chunk=5)
        torch.save({"metrics": metrics, "mine": mine}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_fid_on_one_and_two_gloo_processes(tmp_path):
    single, mine = run_share(0, 1, num_samples=37, chunk=5)
    assert mine == list(range(37))
    # fork: the workers inherit the imports (spawn would re-import torch and Lightning in each)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert set(r0["mine"]).isdisjoint(r1["mine"]) and sorted(r0["mine"] + r1["mine"]) == list(range(37))
    for key in ("fid_37", "inception_score", "precision", "recall", "kid", "kid_stderr", "fid_37_bootstrap_std"):
        assert r0["metrics"][key] == pytest.approx(single[key], rel=1e-9), key
        assert r1["metrics"][key] == r0["metrics"][key]
    assert r0["metrics"]["num_samples"] == 37
    np.testing.assert_allclose(r0["metrics"]["_moments"]["pool"][1], single["_moments"]["pool"][1], rtol=1e-10,
                               atol=1e-12)


def test_reference_stats_from_the_datamodule_computed_once(tmp_path):
    dm = DigitsDataModule(image_size=8, batch_size=32)
    ext = LinearFeatures(pixels=64)
    path = tmp_path / "ref.npz"
    ref = get_reference(str(path), ext, dm, torch.device("cpu"), True, None, 100, rows=500)
    x = dm.train_set.tensors[0]  # every train image once (no shuffle, no drop_last)
    with torch.no_grad():
        feats = ext(quantize(dm.decode(x)))["pool"].double().numpy()
    assert ref.count == len(x) == 1617 and ref.identity["count"] == 1617
    np.testing.assert_allclose(ref.stats["pool"][0], feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(ref.stats["pool"][1], np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-10)
    # rows: 500 distinct train images, a seeded random subset (not the first 500)
    assert ref.rows.shape == (500, 6)
    match = [int(np.argmin(np.abs(feats - r).sum(1))) for r in ref.rows]
    assert len(set(match)) == 500 and max(match) > 1000
    again = get_reference(str(path), ext, None, torch.device("cpu"), False, None, 100, rows=500)  # loaded
    np.testing.assert_array_equal(again.stats["pool"][1], ref.stats["pool"][1])
    np.testing.assert_array_equal(again.rows, ref.rows)
    assert again.identity["extractor"] == "linear-test"
    with pytest.raises(ReferenceError, match="compute_ref_if_missing"):
        get_reference(str(tmp_path / "none.npz"), ext, dm, torch.device("cpu"), False, None, 100)
