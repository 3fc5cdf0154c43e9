"""The stack every report records, and the check that stops runs on a stack that generates wrong."""

from importlib.metadata import version

import pytest
import torch
from conftest import tiny_model
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

from codelens import CodebookConfig
from codelens.cli import main
from codelens.environment import StackError, check_cached_generation, stack

PROMPTS = torch.tensor([[10, 1, 2], [10, 7, 4]])


def test_stack_names_the_installed_versions():
    versions = stack()
    for package in ("codelens", "torch", "transformers", "transformer-lens", "tokenizers"):
        assert versions[package] == version(package)


def test_version_command_prints_the_stack(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"transformers {version('transformers')}" in lines
    assert f"codelens {version('codelens')}" in lines


def test_cached_generation_check_passes_on_a_sound_stack(arch):
    check_cached_generation(tiny_model(arch, CodebookConfig(n_codes=20, k=1)), PROMPTS)


def test_cached_generation_check_stops_a_stack_whose_cache_stays_empty():
    # What transformers 5.24 did to TL 4.3's attention bridges: the cache is never extended.
    model = tiny_model("gpt2", CodebookConfig(n_codes=20, k=1))
    for module in model.modules():
        if isinstance(module, AttentionBridge):
            module._update_kv_cache = lambda k, v, **kwargs: (k, v)
    model.train()
    with pytest.raises(StackError, match=f"transformers {version('transformers')}"):
        check_cached_generation(model, PROMPTS)
    assert model.training  # the check restores the mode it found
