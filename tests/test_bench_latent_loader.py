"""Smoke test of benchmarks/latent_loader.py at tiny sizes: it runs and its JSON has the promised fields."""

import json

from benchmarks.latent_loader import main


def test_latent_loader_benchmark_writes_json(tmp_path):
    out = tmp_path / "latent_loader.json"
    main(["--out", str(out), "--encode-images", "6", "--resolution", "64", "--encode-workers", "0",
          "--shard-size", "4", "--read-count", "300", "--batch-size", "32", "--read-seconds", "0.3",
          "--work-dir", str(tmp_path)])
    data = json.loads(out.read_text())
    read, encode = data["read"], data["encode"]
    assert read["latent_shape"] == [4, 8, 8] and read["cache_entries"] == 300
    assert read["latents_per_s_per_process"] > 0 and read["latents_per_cpu_s_per_process"] > 0
    assert read["target_latents_per_s_per_process"] == 20_000 and isinstance(read["meets_target"], bool)
    assert {(r["num_workers"], r["sample_posterior"]) for r in read["runs"]} == {(0, True), (0, False)}
    assert all(r["latents"] > 0 and r["latents"] % 32 == 0 for r in read["runs"])
    assert encode["images"] == 6 and encode["images_per_s"] > 0 and encode["latents_per_s"] == 2 * encode["images_per_s"]
    assert encode["preprocess_images_per_cpu_s"] > 0
    assert encode["vae_is_sd_vae"] is False and "NOT the SD VAE" in encode["vae"]
    assert "cpu_model" in data["machine"]
    assert [p.name for p in tmp_path.iterdir()] == ["latent_loader.json"]  # scratch removed
