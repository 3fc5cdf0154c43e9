"""Every ```python block of README.md and docs/ runs, so a doc example cannot rot.

Each page's blocks run in order in one namespace (a page builds on its earlier blocks), in
a temporary working directory, offline, on tiny models. Two maps make that possible and
are the whole difference between what a page shows and what runs here:

- ``SETUP``: code run before a page's first block, for pages that continue from another
  page (they use the quickstart's ``model`` and ``tokens``) or that load a model a
  command line run would have trained (``runs/stories/final``): a tiny stand-in is saved
  there first.
- ``SUBSTITUTIONS``: exact text replaced in a page's code: hub models
  (``EleutherAI/pythia-70m``, the paper authors' models) become `stand_in`, a tiny random
  GPT-NeoX with 4 layers and a BPE tokenizer, and step counts become a few steps. Every
  entry must match the page, so the map cannot go stale silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def stand_in(*_args, codebook=None, **_kwargs):
    """A 4-layer GPT-NeoX of width 32 with a BPE tokenizer, in place of a hub model."""
    from codelens import HookedCodebookTransformer
    from codelens.data.stories import generate_stories
    from codelens.data.text import train_bpe_tokenizer

    texts = [s.text for s in generate_stories(100, seed=0)] + ["The year was 1999."]
    tokenizer = train_bpe_tokenizer(texts, 400)
    config = dict(
        model_type="gpt_neox",
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        vocab_size=len(tokenizer),
    )
    return HookedCodebookTransformer.from_config(config, tokenizer, codebook, seed=0)


QUICKSTART_MODEL = "\n".join(blocks(ROOT / "docs" / "quickstart.md")[1:2])
STAND_IN_MODEL = (
    "import torch\nfrom codelens import CodebookConfig\n"
    "model = stand_in(codebook=CodebookConfig(n_codes=64, k=2))\n"
    "tokens = model.to_tokens(['Once upon a time there was a cat.', 'The year was 1999.'])\n"
)
STORIES_RUN = (
    "from codelens import CodebookConfig\n"
    "stand_in(codebook=CodebookConfig(n_codes=32, k=2, sites=('attn',)))"
    ".save_pretrained('runs/stories/final')\n"
)
TOKFSM_RUN = (
    "from codelens import CodebookConfig, HookedCodebookTransformer\n"
    "HookedCodebookTransformer.from_config(dict(model_type='gpt_neox', hidden_size=32,"
    " num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,"
    " max_position_embeddings=64, vocab_size=fsm.vocab_size), fsm.tokenizer(),"
    " CodebookConfig(n_codes=32, k=1), seed=0).save_pretrained('runs/tokfsm-demo/final')\n"
)
PYTHIA = """HookedCodebookTransformer.from_pretrained(
    "EleutherAI/pythia-70m", codebook=CodebookConfig(n_codes=1000, k=8)
)"""

SETUP: dict[str, str] = {
    "docs/index.md": QUICKSTART_MODEL,
    "docs/interventions.md": QUICKSTART_MODEL,
    "docs/visualisation.md": QUICKSTART_MODEL,
    "docs/speed.md": STAND_IN_MODEL,
    "docs/training.md": "",  # its YAML example is written to config.yaml, see below
    "docs/baselines.md": STAND_IN_MODEL,
}

SUBSTITUTIONS: dict[str, list[tuple[str, str]]] = {
    "README.md": [(PYTHIA, "stand_in(codebook=CodebookConfig(n_codes=1000, k=8))")],
    "docs/quickstart.md": [
        (
            """HookedCodebookTransformer.from_pretrained(
    "EleutherAI/pythia-70m",
    CodebookConfig(n_codes=1000, k=8, sites=("attn", "mlp")),
)""",
            'stand_in(codebook=CodebookConfig(n_codes=1000, k=8, sites=("attn", "mlp")))',
        )
    ],
    "docs/loading.md": [
        ('HookedCodebookTransformer.from_pretrained("taufeeque/', 'stand_in("taufeeque/'),
        ("HookedCodebookTransformer.from_pretrained(\n", "stand_in(\n"),
    ],
    "docs/baselines.md": [
        (
            'model = HookedCodebookTransformer.from_pretrained("EleutherAI/pythia-70m", '
            "codebook=None)\n",
            "model = stand_in()\n",
        ),
        ("tokens = ...  # [batch, pos] token ids\n", ""),
        ("steps=2000", "steps=5"),
    ],
    "docs/training.md": [('["steps=2000", "codebook.k=4"]', '["steps=3", "codebook.k=4"]')],
    "docs/tutorials/steering.md": [
        ('write_corpus("stories.jsonl", 400, seed=0)', 'write_corpus("stories.jsonl", 40, seed=0)'),
        ("generate_stories(2000, seed=1)", "generate_stories(200, seed=1)"),
        ("max_new_tokens=40", "max_new_tokens=4"),
        (
            'exp = corpus_preset("my_corpus.jsonl", quick=True)\n',
            'exp = dataclasses.replace(corpus_preset("my_corpus.jsonl", quick=True), '
            "vocab_size=300, model=dict(corpus_preset('x', True).model, hidden_size=32, "
            "num_hidden_layers=1, intermediate_size=64), baseline=dict(steps=10, batch_size=8), "
            "codebook_stage=dict(codebook=dict(n_codes=32, k=2, sites=['attn']), steps=5, "
            "train='all', batch_size=8, init_samples=256), samples=1, new_tokens=4, "
            "candidates=1, sweep_samples=1, unsteered_samples=1)\n",
        ),
    ],
    "docs/tutorials/tokfsm.md": [
        ("fsm.sample(256, generator=gen)", "fsm.sample(32, generator=gen)"),
        ("min_count=5", "min_count=1"),
    ],
}
"""Pages whose setup needs a page variable: set just before their first model load."""
BEFORE_LOAD = {
    "docs/tutorials/steering.md": (
        'model = HookedCodebookTransformer.from_pretrained("runs/stories/final")',
        STORIES_RUN,
    ),
    "docs/tutorials/tokfsm.md": (
        'model = HookedCodebookTransformer.from_pretrained("runs/tokfsm-demo/final")',
        TOKFSM_RUN,
    ),
}


def training_yaml() -> str:
    """The first YAML config of docs/training.md, run for a few steps."""
    text = (ROOT / "docs" / "training.md").read_text()
    yaml = re.search(r"^```yaml\n(.*?)^```", text, re.S | re.M).group(1)
    small = {"steps: 500": "steps: 3", "batch_size: 64": "batch_size: 8", "warmup_steps: 20": ""}
    for old, new in small.items():
        assert old in yaml, old
        yaml = yaml.replace(old, new)
    return yaml.replace("eval_every: 250", "eval_every: 0") + "init_samples: 200\n"


def page_code(page: Path) -> str:
    name = page.relative_to(ROOT).as_posix()
    code = "\n".join(blocks(page))
    for old, new in SUBSTITUTIONS.get(name, []):
        assert old in code, f"{name}: the substitution for {old!r} no longer matches"
        code = code.replace(old, new)
    if name in BEFORE_LOAD:
        anchor, setup = BEFORE_LOAD[name]
        assert anchor in code, f"{name}: {anchor!r} no longer in the page"
        code = code.replace(anchor, setup + anchor, 1)
    return SETUP.get(name, "") + "\n" + code


@pytest.mark.parametrize(
    "page", [p for p in PAGES if blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CODELENS_PROGRESS", "0")
    (tmp_path / "config.yaml").write_text(training_yaml())
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__", "stand_in": stand_in}
    exec(compile(page_code(page), str(page), "exec"), namespace)


def test_every_substitution_and_setup_names_a_page_with_code():
    for name in [*SETUP, *SUBSTITUTIONS, *BEFORE_LOAD]:
        assert blocks(ROOT / name), name
