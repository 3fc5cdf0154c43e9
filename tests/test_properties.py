"""Property-based tests (hypothesis): for any config, token input, intervention spec or
damage to a checkpoint file, codelens gives a clear error or the correct result."""

import re
import shutil
import warnings

import pytest
import torch
from conftest import VOCAB, tiny_model
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from codelens import CodebookConfig, HookedCodebookTransformer
from codelens.checkpoint import CheckpointError
from codelens.interventions import CodeIntervention, intervene

FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.integers(-3, 3),
)


def _clear(err: Exception, *names: str) -> bool:
    """A clear error is a ValueError that names what is wrong."""
    event("clear error")
    return isinstance(err, ValueError) and any(name in str(err) for name in names)


def _correct() -> None:
    event("correct result")


@pytest.fixture(scope="module")
def base():
    return tiny_model("gpt_neox")


@pytest.fixture(scope="module")
def quantised():
    return tiny_model("gpt_neox", CodebookConfig(n_codes=6, k=2, mlp_groups=2))


# ------------------------------------------------------------------ configs

FIELDS = {
    "n_codes": st.one_of(st.integers(-2, 40), ODD),
    "k": st.one_of(st.integers(-1, 5), ODD),
    "mlp_n_codes": st.one_of(st.none(), st.integers(-1, 20), ODD),
    "sites": st.one_of(
        st.lists(st.sampled_from(["attn", "mlp", "resid", ""]), max_size=3), st.text(max_size=4)
    ),
    "layers": st.one_of(st.none(), st.lists(st.integers(-1, 3), max_size=3), ODD),
    "similarity": st.one_of(st.sampled_from(["cosine", "dot", "euclidean", "Cosine"]), ODD),
    "combine": st.one_of(st.sampled_from(["sum", "mean", "max"]), ODD),
    "layer_norm": st.one_of(st.booleans(), ODD),
    "layer_norm_affine": st.one_of(st.booleans(), ODD),
    "mlp_groups": st.one_of(st.integers(-1, 5), ODD),
    "memory_budget_mb": st.one_of(st.floats(allow_nan=True, allow_infinity=True), ODD),
}


VALID = {
    "n_codes": st.integers(1, 12),
    "k": st.integers(1, 3),
    "mlp_n_codes": st.none() | st.integers(3, 12),
    "sites": st.lists(st.sampled_from(["attn", "mlp"]), min_size=1, max_size=2, unique=True),
    "layers": st.none() | st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True),
    "similarity": st.sampled_from(["cosine", "dot", "euclidean"]),
    "combine": st.sampled_from(["sum", "mean"]),
    "layer_norm": st.booleans(),
    "layer_norm_affine": st.booleans(),
    "mlp_groups": st.sampled_from([1, 2, 3, 4]),
    "memory_budget_mb": st.floats(1e-4, 2048),
}


@st.composite
def configs(draw):
    """Plausible fields, with one of them (or none) replaced by an odd value."""
    fields = draw(st.fixed_dictionaries({}, optional=VALID))
    odd = draw(st.none() | st.sampled_from(sorted(FIELDS)))
    if odd is not None:
        fields[odd] = draw(FIELDS[odd])
    return fields


@FAST
@given(fields=configs())
def test_any_config_is_refused_by_name_or_quantises_correctly(base, fields, tokens):
    try:
        config = CodebookConfig(**fields)
    except Exception as err:  # noqa: BLE001 - the property is about which errors
        assert _clear(err, *fields), f"{fields}: {err!r}"
        return
    before = base(tokens)
    try:
        base.add_codebooks(config)
    except ValueError as err:
        assert _clear(err, "layers", "mlp_groups"), f"{fields}: {err!r}"
        assert base.codebooks == {} and torch.equal(base(tokens), before)
        return
    try:
        layers = range(2) if config.layers is None else config.layers
        expected = {f"blocks.{layer}.attn.hook_z" for layer in layers if "attn" in config.sites}
        expected |= {f"blocks.{layer}.hook_mlp_out" for layer in layers if "mlp" in config.sites}
        assert set(base.codebooks) == expected
        for site, cb in base.codebooks.items():
            n = config.site_n_codes("mlp" if "mlp" in site else "attn")
            assert (cb.n_codes, cb.k) == (n, config.k)
        logits, cache = base.run_with_cache(tokens)
        assert logits.shape == (*tokens.shape, VOCAB) and torch.isfinite(logits).all()
        for site, cb in base.codebooks.items():
            ids = cache[f"{site}.hook_codes"]
            assert ids.shape[-1] == config.k and ((ids >= 0) & (ids < cb.n_codes)).all()
            if config.k > 1:  # k distinct codes per group
                assert (ids.sort(-1).values.diff(dim=-1) != 0).all()
        _correct()
    finally:
        base.remove_codebooks()


# ------------------------------------------------------------------ token inputs


@FAST
@given(
    shape=st.lists(st.integers(0, 70), min_size=1, max_size=3),
    low=st.integers(-3, VOCAB + 2),
    span=st.integers(0, VOCAB + 3),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]),
    seed=st.integers(0, 2**16),
)
def test_any_token_tensor_gives_a_clear_error_or_the_int64_result(
    quantised, shape, low, span, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(low, low + span + 1, shape, generator=gen)
    if dtype == torch.uint8:
        assume(values.numel() == 0 or values.min() >= 0)
    tokens = values.to(dtype)
    with torch.no_grad():
        try:
            logits = quantised(tokens)
        except Exception as err:  # noqa: BLE001
            named = ("token ids", "integer tensor", "tokens is empty", "positions", "input")
            assert _clear(err, *named), f"{tuple(shape)} {dtype}: {err!r}"
            return
        assert dtype in (torch.int64, torch.int32, torch.uint8)
        assert values.min() >= 0 and values.max() < VOCAB
        reference = quantised(values.long().reshape(-1, values.shape[-1]))
    assert torch.equal(logits.reshape(reference.shape), reference)
    _correct()


@FAST
@given(text=st.one_of(st.text(max_size=80), st.lists(st.text(max_size=12), max_size=3)))
def test_any_text_gives_a_clear_error_or_logits_for_its_tokens(quantised, text):
    with torch.no_grad():
        try:
            logits = quantised(text)
        except Exception as err:  # noqa: BLE001
            assert _clear(err, "input is empty", "positions", "vocabulary"), f"{text!r}: {err!r}"
            return
        tokens = quantised.to_tokens(text, truncate=False)
    assert logits.shape == (*tokens.shape, VOCAB) and torch.isfinite(logits).all()
    _correct()


# ------------------------------------------------------------------ interventions

SITES = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out", "nope"]
CODES = st.lists(st.integers(-2, 7), min_size=0, max_size=3)
POSITIONS = st.one_of(
    st.none(),
    st.integers(-15, 15),
    st.lists(st.integers(-15, 15), max_size=3),
    st.builds(slice, st.none() | st.integers(-15, 15), st.none() | st.integers(-15, 15)),
)


def _selected(positions, length):
    """The token positions an intervention's ``positions`` select, None if out of range."""
    if positions is None:
        return list(range(length))
    if isinstance(positions, slice):
        return list(range(length))[positions]
    chosen = [positions] if isinstance(positions, int) else positions
    if any(not -length <= p < length for p in chosen):
        return None
    return sorted({p % length for p in chosen})


@FAST
@given(
    kind=st.sampled_from(["force", "swap", "ablate"]),
    site=st.sampled_from(SITES),
    codes=CODES,
    targets=CODES,
    group=st.one_of(st.none(), st.integers(-1, 4)),
    positions=POSITIONS,
)
def test_any_intervention_is_refused_clearly_or_does_exactly_what_it_says(
    quantised, tokens, kind, site, codes, targets, group, positions
):
    try:
        if kind == "force":
            iv = CodeIntervention.force(site, codes, group=group, positions=positions)
        elif kind == "ablate":
            iv = CodeIntervention.ablate(site, codes, group=group, positions=positions)
        else:
            iv = CodeIntervention.swap(site, (codes, targets), group=group, positions=positions)
        with torch.no_grad(), intervene(quantised, iv):
            _, cache = quantised.run_with_cache(tokens, names_filter=lambda n: "hook_codes" in n)
    except Exception as err:  # noqa: BLE001
        event("clear error")
        assert isinstance(err, ValueError | IndexError | KeyError), repr(err)
        assert re.search(r"code|site|group|position|slot|swap|force|ablat", str(err)), repr(err)
        return
    selected = _selected(positions, tokens.shape[1])
    assert selected is not None and site in quantised.codebooks, "an invalid spec ran silently"
    with torch.no_grad():
        _, plain = quantised.run_with_cache(tokens, names_filter=lambda n: "hook_codes" in n)
    edited, before = cache[f"{site}.hook_codes"], plain[f"{site}.hook_codes"]
    groups = slice(None) if group is None else slice(group, group + 1)
    inside = edited[:, selected][:, :, groups]
    outside = [p for p in range(tokens.shape[1]) if p not in selected]
    assert torch.equal(edited[:, outside], before[:, outside])  # nothing else changes
    if kind == "force":
        assert (inside[..., -len(codes) :] == torch.tensor(codes)).all()
    elif kind == "ablate":
        assert not torch.isin(inside, torch.tensor(codes)).any()
    else:
        moved = [a for a, b in zip(codes, targets, strict=True) if a != b and a not in targets]
        assert not torch.isin(inside, torch.tensor(moved, dtype=torch.long)).any()
    _correct()


# ------------------------------------------------------------------ checkpoint files


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, quantised):
    path = tmp_path_factory.mktemp("fuzz") / "ck"
    quantised.save_pretrained(path)
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return path, files


@settings(FAST, max_examples=40)
@given(
    data=st.data(),
    action=st.sampled_from(["flip", "truncate", "insert", "replace", "stray"]),
)
def test_any_damaged_checkpoint_file_is_named_or_loads_bit_exact(
    pristine, quantised, tmp_path_factory, tokens, data, action
):
    source, files = pristine
    case = tmp_path_factory.mktemp("case") / "ck"
    shutil.copytree(source, case)
    rel = data.draw(st.sampled_from(files), label="file")
    target = case / rel
    raw = bytearray(target.read_bytes())
    at = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="offset")
    if action == "flip":
        raw[at] ^= data.draw(st.integers(1, 255), label="mask")
    elif action == "truncate":
        raw = raw[:at]
    elif action == "insert":
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
    elif action == "replace":
        raw = bytearray(data.draw(st.binary(max_size=64), label="content"))
    if action == "stray":
        (case / "notes.txt").write_bytes(bytes(raw))
    else:
        target.write_bytes(bytes(raw))
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            loaded = HookedCodebookTransformer.from_pretrained(case)
    except CheckpointError as err:
        event("clear error")
        assert action != "stray" and rel in str(err), f"{action} {rel}: {err}"
        return
    finally:
        shutil.rmtree(case.parent)
    assert action == "stray" or bytes(raw) == (source / rel).read_bytes()
    with torch.no_grad():
        assert torch.equal(loaded(tokens), quantised(tokens))
    _correct()
