"""Torch FastICA against scikit-learn on known mixtures, streamed from memory maps."""

import numpy as np
import pytest
import torch

from codelens.baselines import amari_distance, fast_ica, ica_features


def known_mixture(seed: int, n: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Six non-Gaussian sources of different kinds, mixed by a random square matrix."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 6, generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    sources = torch.stack(
        [
            torch.log(u[:, 0] / (1 - u[:, 0])),  # logistic
            u[:, 1] * 2 - 1,  # uniform
            torch.sign(u[:, 2] - 0.5) * -torch.log(1 - 2 * (u[:, 2] - 0.5).abs()),  # Laplace
            -torch.log(u[:, 3]) - 1,  # exponential
            torch.sign(u[:, 4] - 0.5),  # binary
            (u[:, 5] * 2 - 1) ** 3,  # peaked
        ],
        1,
    )
    return sources, torch.randn(6, 6, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_fastica_unmixes_as_well_as_scikit_learn(seed):
    from sklearn.decomposition import FastICA

    sources, mixing = known_mixture(seed)
    x = sources @ mixing
    sk = FastICA(n_components=6, whiten="unit-variance", max_iter=400, random_state=seed)
    sk.fit(x.numpy())
    ours = fast_ica(x, 6, seed=seed)
    theirs = amari_distance(mixing @ torch.from_numpy(sk.components_.T))
    mine = amari_distance(mixing.float() @ ours.unmixing)
    assert ours.converged
    assert mine < 0.05 and abs(mine - theirs) <= 0.01, (mine, theirs)
    sources_hat = (x.float() - ours.mean) @ ours.unmixing  # unit variance, like sklearn's
    torch.testing.assert_close(sources_hat.var(0), torch.ones(6), atol=1e-3, rtol=0)
    torch.testing.assert_close(sources_hat @ ours.mixing + ours.mean, x.float(), atol=1e-3, rtol=0)


def test_streamed_chunks_from_a_memory_map_give_the_in_memory_fit(tmp_path):
    sources, mixing = known_mixture(3, n=6_000)
    x = (sources @ mixing).float()
    before = x.clone()
    path = tmp_path / "acts.f32"
    x.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=tuple(x.shape))
    whole = fast_ica(x, seed=1)
    streamed = fast_ica(mapped, seed=1, chunk_rows=1000)
    assert torch.equal(x, before), "fitting wrote into the caller's data"
    assert whole.n_iter == streamed.n_iter
    torch.testing.assert_close(streamed.unmixing, whole.unmixing, atol=1e-4, rtol=1e-3)
    rows = np.arange(0, 6000, 2)
    torch.testing.assert_close(
        fast_ica(mapped, rows=rows, seed=1, chunk_rows=700).unmixing,
        fast_ica(x[::2], seed=1).unmixing,
        atol=1e-4,
        rtol=1e-3,
    )
    features = ica_features(mapped, "s", max_tokens=None)
    assert features.encoder.shape == (6, 6)


def test_amari_distance_is_zero_for_a_scaled_permutation_and_errors():
    perm = torch.eye(4)[[2, 0, 3, 1]] * torch.tensor([3.0, -1.0, 0.5, 2.0])
    assert amari_distance(perm) == 0.0
    assert amari_distance(torch.ones(4, 4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="square"):
        amari_distance(torch.ones(3, 4))
    with pytest.raises(ValueError, match="fewer than n_components"):
        fast_ica(torch.randn(100, 2) @ torch.randn(2, 5), 4)
    with pytest.raises(ValueError, match="NaN"):
        fast_ica(torch.full((10, 3), float("nan")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_ica_on_cuda_matches_the_cpu():
    sources, mixing = known_mixture(0)
    x = (sources @ mixing).float()
    cpu, gpu = fast_ica(x, seed=0), fast_ica(x, seed=0, device="cuda")
    assert (
        abs(
            amari_distance(mixing.float() @ cpu.unmixing)
            - amari_distance(mixing.float() @ gpu.unmixing)
        )
        <= 0.01
    )
