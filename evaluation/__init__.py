"""One home for evaluation, used by the training callback (callbacks/fid.py) and evaluate.py.

  samples.py      which samples exist (noise/labels per index), chunks per rank, the resumable chunk store
  features.py     feature extractors: Inception (pool, spatial, logits), the digits CNN, DINOv2 (dinov2.py)
  stats.py        float64 sums: Frechet distance, Inception Score (exact over DDP ranks)
  kid.py          KID: unbiased MMD^2 with the cubic polynomial kernel, and its standard error
  manifold.py     ADM's k-NN precision / recall, batched
  metrics.py      the accumulators of one evaluation (every metric from the same samples, one pass)
  reference.py    reference statistics: identity, keyed files, seeded subsets, rank 0 decides
  checkpoint.py   ckpt path -> (network, objective, fingerprint, step)
  engine.py       the loop both entry points run; records (one JSON line per evaluation)
  distributed.py  rank/world, exact sums and gathers, broadcast from rank 0
  matmul.py       the one fp32 matmul precision evaluation runs under
"""
