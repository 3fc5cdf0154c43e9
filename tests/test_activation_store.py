"""Baseline activations on disk: memory-mapped shards, SAEs trained from them on a device."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

from codelens.baselines import (
    ActivationStore,
    SAEConfig,
    cache_activations,
    store_activations,
    train_sae,
)

SITES = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]


def test_store_holds_what_the_cache_holds_and_reopens_from_disk(tmp_path):
    model = tiny_model("gpt_neox")
    tokens = torch.randint(0, 10, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    in_ram = cache_activations(model, tokens, SITES, token_mask=mask, batch_size=4)
    store = store_activations(
        model, tokens, SITES, tmp_path / "acts", token_mask=mask, batch_size=4
    )
    again = ActivationStore(tmp_path / "acts")
    for site in SITES:
        assert isinstance(again[site], np.memmap)
        torch.testing.assert_close(torch.from_numpy(np.array(again[site])), in_ram[site])
    assert store.n_tokens == int(mask.sum())
    assert not list((tmp_path / "acts").glob(".*tmp")), "temporary files left behind"
    with pytest.raises(KeyError, match="no site"):
        again["blocks.5.hook_mlp_out"]
    with pytest.raises(FileNotFoundError, match="no activation store"):
        ActivationStore(tmp_path)


def test_sae_trains_from_a_memory_map_as_from_a_tensor(tmp_path):
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(3000, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 2.0
    path = tmp_path / "acts.f32"
    acts.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=(3000, 8))
    config = SAEConfig(n_latents=16, k=2, steps=60, batch_size=128)
    from_tensor, stats_t = train_sae(acts, "s", config)
    from_map, stats_m = train_sae(mapped, "s", config, device="cpu", chunk_rows=700)
    for name, value in from_tensor.state_dict().items():
        torch.testing.assert_close(from_map.state_dict()[name], value, atol=1e-4, rtol=1e-4)
    assert stats_m.losses == pytest.approx(stats_t.losses, rel=1e-4)
    assert from_map.decoder.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sae_trains_on_cuda_from_a_cpu_store(tmp_path):
    acts = torch.randn(2000, 8)
    config = SAEConfig(n_latents=16, k=2, steps=40, batch_size=128)
    cpu, _ = train_sae(acts, "s", config)
    gpu, _ = train_sae(acts, "s", config, device="cuda")
    assert gpu.decoder.device.type == "cpu"
    torch.testing.assert_close(gpu.decoder, cpu.decoder, atol=1e-3, rtol=1e-3)
