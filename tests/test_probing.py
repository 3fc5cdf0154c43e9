"""codelens.analysis.probing: k-sparse probes and per-document features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from codelens import CodebookConfig
from codelens.analysis import (
    balanced_split,
    document_code_rates,
    k_sparse_probe,
    pooled_features,
    probing_table,
)
from codelens.baselines import SAEConfig, identity_features, neurons, train_sae
from codelens.vocab import Code, attn_site, collect_codes, mlp_post, mlp_site


def planted(n: int = 2000, f: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=gen) < 0.3
    features = torch.randn(n, f, generator=gen)
    return features, labels, gen


def test_balanced_split_is_balanced_and_disjoint():
    _, labels, _ = planted()
    train, test = balanced_split(labels, test_fraction=0.2, seed=3)
    assert set(train.tolist()).isdisjoint(test.tolist())
    for rows in (train, test):
        assert int(labels[rows].sum()) * 2 == len(rows)
    n_pos = int(labels.sum())
    assert len(test) // 2 == round(0.2 * n_pos)  # the minority class sets the size
    again = balanced_split(labels, test_fraction=0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, (train, test), strict=True))


def test_a_planted_feature_is_found_and_random_features_are_at_chance():
    features, labels, gen = planted()
    noise = k_sparse_probe(features, labels)
    print("\nrandom features:", noise)
    assert all(abs(acc - 0.5) < 0.1 for acc in noise.values())
    features[:, 17] = labels.float() + 0.1 * torch.randn(len(labels), generator=gen)
    found = k_sparse_probe(features, labels, ks=(1, 5))
    print("planted feature:", found)
    assert found[1] >= 0.99 and found[5] >= 0.97


def test_selection_sees_only_the_train_split():
    features, labels, gen = planted(f=20)
    train, test = balanced_split(labels, 0.2, seed=0)
    sign = labels.float() * 2 - 1
    # Feature 3 is the label on the test rows only, and noise on the others; feature 9 is
    # weakly informative everywhere.
    features[:, 3] = torch.randn(len(labels), generator=gen)
    features[test, 3] = 10 * sign[test]
    features[:, 9] = 0.3 * sign + torch.randn(len(labels), generator=gen)
    gaps = (features[labels].mean(0) - features[~labels].mean(0)).abs()
    assert gaps.argmax() == 3  # chosen on all rows, the leaked feature would win
    accuracy = k_sparse_probe(features, labels, ks=(1,))[1]
    print(f"\nk=1 accuracy without leakage: {accuracy:.3f}")
    assert 0.5 < accuracy < 0.8  # feature 9's level, not the 1.0 of feature 3


def test_probe_errors():
    features, labels, _ = planted(n=40, f=6)
    with pytest.raises(ValueError, match="k=10 is more than the 6 features"):
        k_sparse_probe(features, labels, ks=(1, 10))
    with pytest.raises(ValueError, match="0 negative"):
        k_sparse_probe(features, torch.ones(40, dtype=torch.bool), ks=(1,))
    one = torch.zeros(40, dtype=torch.bool)
    one[5] = True
    with pytest.raises(ValueError, match=">= 2 rows of each class"):
        k_sparse_probe(features, one, ks=(1,))
    with pytest.raises(ValueError, match="1-d bool"):
        k_sparse_probe(features, labels.long(), ks=(1,))
    with pytest.raises(ValueError, match="40 feature rows but 39 labels"):
        k_sparse_probe(features, labels[:39], ks=(1,))
    with pytest.raises(ValueError, match="float"):
        k_sparse_probe(features.long(), labels, ks=(1,))
    with pytest.raises(ValueError, match="ks"):
        k_sparse_probe(features, labels, ks=(0,))
    bad = features.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        k_sparse_probe(bad, labels, ks=(1,))
    with pytest.raises(ValueError, match="test_fraction"):
        balanced_split(labels, 0.0)


def test_probing_table_rows_and_means():
    gen = torch.Generator().manual_seed(1)
    topics = ["sea", "farm", "space"]
    labels = [topics[i % 3] for i in range(300)]
    wide = torch.randn(300, 30, generator=gen)
    for t, topic in enumerate(topics):
        wide[:, t] += 3 * torch.tensor([label == topic for label in labels]).float()
    narrow = torch.randn(300, 4, generator=gen)
    rows = probing_table({"wide": wide, "narrow": narrow}, labels, topics[:2], ks=(1, 5))
    assert [(r["method"], r["k"]) for r in rows] == [
        ("wide", 1),
        ("wide", 5),
        ("narrow", 1),
        ("narrow", 5),
    ]
    assert rows[3]["accuracy"] is None and rows[3]["per_topic"] == {}
    for r in rows[:3]:
        assert set(r["per_topic"]) == {"sea", "farm"}
        assert r["accuracy"] == pytest.approx(np.mean(list(r["per_topic"].values())))
    assert rows[0]["accuracy"] > 0.9 and abs(rows[2]["accuracy"] - 0.5) < 0.2
    with pytest.raises(ValueError, match=r"topics \['city'\] have no documents"):
        probing_table({"wide": wide}, labels, ["city"])
    with pytest.raises(ValueError, match="narrow: 4 feature rows"):
        probing_table({"narrow": narrow[:4]}, labels, topics)


# ---------------------------------------------------------------- per-document features


@pytest.fixture(scope="module")
def coded():
    return tiny_model("gpt_neox", CodebookConfig(n_codes=8, k=2, sites=("attn", "mlp")))


@pytest.fixture(scope="module")
def docs():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (5, 12), generator=gen)
    mask = torch.rand(5, 12, generator=gen) < 0.6
    mask[:, 0] = False  # BOS-like first token left out
    mask[:, 1] = True
    return tokens, mask


def test_code_rates_equal_a_naive_count(coded, docs):
    tokens, mask = docs
    rates, columns = document_code_rates(coded, tokens, mask)
    codes = collect_codes(coded, tokens)
    assert rates.shape == (5, len(columns))
    expected = torch.zeros_like(rates)
    offset = 0
    for site, ids in codes.items():
        n_groups, n_codes = ids.shape[2], coded.codebook(site).n_codes
        for d in range(5):
            for p in range(12):
                if not mask[d, p]:
                    continue
                for g in range(n_groups):
                    for c in ids[d, p, g].tolist():
                        if c >= 0:
                            expected[d, offset + g * n_codes + c] += 1 / int(mask[d].sum())
        offset += n_groups * n_codes
    assert torch.allclose(rates, expected, atol=1e-6)
    # Columns name their codes, site by site.
    assert columns.code(0) == Code(attn_site(0), 0, 0)
    heads = coded.codebook(attn_site(0)).n_groups
    assert columns.code(heads * 8 + 3) == Code(mlp_site(0), 0, 3)
    with pytest.raises(ValueError, match="out of range"):
        columns.code(len(columns))
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"documents \[2\] keep no tokens"):
        document_code_rates(coded, tokens, empty)


def test_pooled_features_equal_a_naive_mean(coded, docs):
    tokens, mask = docs
    model = tiny_model("gpt_neox")
    config = SAEConfig(n_latents=16, k=3, steps=5, batch_size=64, seed=0)
    sae, _ = train_sae(torch.randn(256, 32), mlp_site(1), config)
    features = [*identity_features(model, [mlp_post(0), attn_site(1)]), sae]
    pooled = pooled_features(model, tokens, mask, features, batch_size=2)
    names = [mlp_post(0), attn_site(1), mlp_site(1)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    z = cache[attn_site(1)].flatten(-2)
    expected = torch.stack(
        [
            torch.cat(
                [
                    cache[mlp_post(0)][d][mask[d]].mean(0),
                    z[d][mask[d]].mean(0),
                    sae.encode(cache[mlp_site(1)][d][mask[d]]).mean(0),
                ]
            )
            for d in range(5)
        ]
    )
    assert pooled.shape == expected.shape
    assert torch.allclose(pooled, expected, atol=1e-5)
    with pytest.raises(ValueError, match="no features"):
        pooled_features(model, tokens, mask, [])


def test_probing_section_of_the_experiment_and_its_table():
    from codelens.baselines import site_width
    from codelens.experiments import baselines as bl

    coded = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2), seed=0)
    base = tiny_model("gpt2", seed=0)
    sites = list(coded.codebooks)
    config = SAEConfig(n_latents=24, k=2, steps=3, batch_size=32, seed=0)
    saes = [train_sae(torch.randn(64, site_width(base, s)), s, config)[0] for s in sites]
    pca_like = [neurons(s, site_width(base, s)) for s in sites]  # not an SAE: not probed
    methods = [bl.Baseline("SAE matched L0", saes, 1.0), bl.Baseline("PCA", pca_like, 1.0)]
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 10, (30, 10), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    labels = [("a", "b", "c")[i % 3] for i in range(30)]
    section = bl.probing_section(base, coded, methods, tokens, mask, labels, ["a", "b"], (1, 2))
    n_codes = sum(coded.codebook(s).n_groups * 8 for s in sites)
    assert section["features"] == {
        "codes (codebook model)": n_codes,
        "SAE matched L0": 24 * len(sites),
        "MLP neurons (base model)": 2 * 128,
        "raw activations (base model, codebook sites)": 32 * len(sites),
    }
    assert len(section["rows"]) == 4 * 2 and section["documents"] == 30
    assert all(0 <= r["accuracy"] <= 1 for r in section["rows"])
    lines = bl.probing_markdown(section)
    assert lines[0] == "### k-sparse probing of topics"
    assert lines[4] == "| method | features | k=1 | k=2 |"
    first = next(r for r in section["rows"] if r["k"] == 1)
    assert lines[6].startswith(
        f"| codes (codebook model) | {n_codes} | {100 * first['accuracy']:.1f} |"
    )
    from codelens.experiments.steering import baselines_markdown

    report = baselines_markdown(
        {"best_sae": "k=4", "rows": [{"method": "codes"}], "probing": section}
    )
    assert report[-len(lines) :] == lines and report[-len(lines) - 1] == ""
