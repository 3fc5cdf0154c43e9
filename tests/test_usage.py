"""Code usage counting by the training monitor."""

import torch
from conftest import tiny_model

from codelens import EMPTY_SLOT, CodebookConfig
from codelens.training.usage import CodebookMonitor


def test_monitor_counts_codes_per_group_and_skips_empty_slots():
    model = tiny_model("gpt2", CodebookConfig(n_codes=8, k=2, sites=("attn",), layers=(0,)))
    site = next(iter(model.codebooks))
    monitor = CodebookMonitor(model)
    count = dict(monitor.hooks())[f"{site}.hook_codes"]
    groups = model.codebook(site).n_groups
    ids = torch.full((3, 5, groups, 2), EMPTY_SLOT)
    ids[..., 0] = 7  # the last code of every group; the empty slot would be the
    ids[0, 0, 0, 0] = 0  # previous group's last code if offset before masking
    count(ids, None)
    expected = torch.zeros(groups, 8, dtype=torch.long)
    expected[:, 7] = 15
    expected[0, 7], expected[0, 0] = 14, 1
    assert torch.equal(monitor.window_counts[site], expected)
    assert torch.equal(monitor.metric_counts[site], expected)
