"""Code interventions on GPT-NeoX and Llama: force, swap, ablate, generation, cleanup, errors."""

import pytest
import torch
from conftest import tiny_model

from codelens import EMPTY_SLOT, CodebookConfig
from codelens.interventions import (
    CodeIntervention,
    ablate_codes,
    force_codes,
    intervene,
    paste_codes_hooks,
    swap_code_sets,
    swap_codes,
)
from codelens.vocab import collect_codes

ARCHS = ["gpt_neox", "llama"]
MLP, ATTN = "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"
K = 3


def make(arch: str = "gpt_neox"):
    """A tiny model: attention sites have 4 groups (heads), MLP sites 2; k = 3 of 16 codes."""
    return tiny_model(arch, CodebookConfig(n_codes=16, k=K, mlp_groups=2))


def site_cache(model, tokens, site):
    """``(ids, quantized)`` at ``site`` from a cached forward."""
    names = (f"{site}.hook_codes", f"{site}.hook_quantized")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return cache[names[0]], cache[names[1]]


def code_sum(model, site, ids):
    """Reference sum of the code vectors named by ``ids`` (EMPTY_SLOT adds nothing)."""
    codes = model.codebook(site).codes.detach()
    groups = torch.arange(codes.shape[0])[:, None]
    vectors = codes[groups, ids.clamp(min=0)] * (ids >= 0)[..., None]
    return vectors.sum(-2)


def all_hooks_removed(model) -> bool:
    points = model.hook_dict.values()
    clean = not any(hp.has_hooks(including_permanent=True) for hp in points)
    return clean and not model.original_model._forward_pre_hooks


def partly_active_code(ids):
    """The most frequent code in ``ids [..., k]`` that is not active in every cell."""
    active = [c for c in range(16) if 0 < (ids == c).any(-1).sum() < ids[..., 0].numel()]
    return max(active, key=lambda c: int((ids == c).sum()))


# ---------------------------------------------------------------- force


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("site", [MLP, ATTN])
def test_force_lowest_slot_only_at_chosen_positions_and_group(arch, site, tokens):
    model = make(arch)
    base_ids, base_q = site_cache(model, tokens, site)
    iv = CodeIntervention.force(site, 7, group=1, positions=[2, -1])
    with intervene(model, iv):
        ids, quantized = site_cache(model, tokens, site)
        logits = model(tokens)
    expected = base_ids.clone()
    expected[:, [2, 11], 1, -1] = 7
    assert torch.equal(ids, expected)
    # The output is exactly the sum of the codes: code 7 replaces the lowest-scoring one.
    layer = model.codebook(site)
    torch.testing.assert_close(quantized, layer.lookup(expected), rtol=0, atol=0)
    torch.testing.assert_close(quantized, code_sum(model, site, expected))
    codes = layer.codes.detach()
    delta = torch.zeros_like(base_q)
    delta[:, [2, 11], 1] = codes[1, 7] - codes[1, base_ids[:, [2, 11], 1, -1]]
    torch.testing.assert_close(quantized - base_q, delta)
    # The bare hook list does the same for a full forward.
    hooks = force_codes(model, site, 7, group=1, positions=[2, -1])
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=hooks), logits, rtol=0, atol=0
    )
    assert all_hooks_removed(model)


def test_force_all_slots_sets_exactly_the_forced_codes(tokens):
    model = make()
    base_ids, base_q = site_cache(model, tokens, MLP)
    with intervene(model, CodeIntervention.force(MLP, [3, 4, 5], slots="all")):
        ids, quantized = site_cache(model, tokens, MLP)
    assert (ids == torch.tensor([3, 4, 5])).all()
    codes = model.codebook(MLP).codes.detach()
    torch.testing.assert_close(
        quantized, (codes[:, 3] + codes[:, 4] + codes[:, 5]).expand_as(quantized)
    )
    # Fewer codes than k: the other slots are empty; a slice picks the positions.
    iv = CodeIntervention.force(MLP, [9], slots="all", positions=slice(0, None, 2))
    same = CodeIntervention(MLP, "force", (9,), positions=slice(0, None, 2), slots="all")
    assert iv == same and len({iv, same}) == 1  # hashable despite the slice
    with intervene(model, iv):
        ids, quantized = site_cache(model, tokens, MLP)
    even = torch.arange(12) % 2 == 0
    assert (ids[:, even] == torch.tensor([9, EMPTY_SLOT, EMPTY_SLOT])).all()
    torch.testing.assert_close(quantized[:, even], codes[:, 9].expand_as(quantized[:, even]))
    assert torch.equal(ids[:, ~even], base_ids[:, ~even])
    torch.testing.assert_close(quantized[:, ~even], base_q[:, ~even], rtol=0, atol=0)


def test_forcing_two_codes_replaces_the_two_lowest_slots(tokens):
    model = make()
    base_ids, _ = site_cache(model, tokens, ATTN)
    with intervene(model, CodeIntervention.force(ATTN, [1, 2], positions=3)):
        ids, _ = site_cache(model, tokens, ATTN)
    expected = base_ids.clone()
    expected[:, 3, :, 1:] = torch.tensor([1, 2])
    assert torch.equal(ids, expected)


# ---------------------------------------------------------------- swap


@pytest.mark.parametrize("arch", ARCHS)
def test_swap_changes_only_where_the_source_code_is_active(arch, tokens):
    model = make(arch)
    site, group = "blocks.1.attn.hook_z", 2
    base_ids, base_q = site_cache(model, tokens, site)
    a = partly_active_code(base_ids[..., group, :])
    b = (a + 1) % 16
    with intervene(model, CodeIntervention.swap(site, {a: b}, group=group)):
        ids, quantized = site_cache(model, tokens, site)
        logits = model(tokens)
    expected = base_ids.clone()
    in_group = expected[..., group, :]
    in_group[in_group == a] = b
    assert torch.equal(ids, expected)
    changed = (quantized != base_q).any(-1)
    was_active = torch.zeros_like(changed)
    was_active[..., group] = (base_ids[..., group, :] == a).any(-1)
    assert torch.equal(changed, was_active) and was_active.any() and not was_active.all()
    # Parallel lists give the same hooks.
    hooks = swap_codes(model, site, ([a], [b]), group=group)
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=hooks), logits, rtol=0, atol=0
    )


def test_swaps_apply_together_and_respect_positions(tokens):
    model = make()
    base_ids, _ = site_cache(model, tokens, MLP)
    a = partly_active_code(base_ids)
    b = partly_active_code(torch.where(base_ids == a, -2, base_ids))
    with intervene(model, CodeIntervention.swap(MLP, {a: b, b: a}, positions=slice(4, 9))):
        ids, _ = site_cache(model, tokens, MLP)
    window = base_ids[:, 4:9]
    swapped = torch.where(window == a, b, torch.where(window == b, a, window))
    assert torch.equal(ids[:, 4:9], swapped)
    assert torch.equal(ids[:, :4], base_ids[:, :4]) and torch.equal(ids[:, 9:], base_ids[:, 9:])


def test_swap_code_sets_replaces_each_sites_codes(tokens):
    model = make()
    attn_ids, _ = site_cache(model, tokens, "blocks.1.attn.hook_z")
    mlp_ids, _ = site_cache(model, tokens, MLP)
    a, c = partly_active_code(attn_ids[..., 0, :]), partly_active_code(mlp_ids[..., 1, :])
    source = {("blocks.1.attn.hook_z", 0): [a], MLP: [c]}
    target = {("blocks.1.attn.hook_z", 0): [(a + 1) % 16], MLP: [(c + 1) % 16]}
    hooks = swap_code_sets(model, source, target)
    ivs = [
        CodeIntervention.swap("blocks.1.attn.hook_z", {a: (a + 1) % 16}, group=0),
        CodeIntervention.swap(MLP, {c: (c + 1) % 16}),
    ]
    with intervene(model, *ivs):
        expected = model(tokens)
    torch.testing.assert_close(
        model.run_with_hooks(tokens, fwd_hooks=hooks), expected, rtol=0, atol=0
    )
    assert not torch.allclose(expected, model(tokens))


# ---------------------------------------------------------------- ablate


def test_paste_codes_puts_the_reference_codes_at_one_position(tokens):
    model = make()
    reference = tokens.flip(0)
    ref = collect_codes(model, reference)
    clean = collect_codes(model, tokens)
    pasted = collect_codes(model, tokens, hooks=paste_codes_hooks({MLP: ref[MLP]}, position=-1))
    assert torch.equal(pasted[MLP][:, -1], ref[MLP][:, -1])
    assert torch.equal(pasted[MLP][:, :-1], clean[MLP][:, :-1])
    assert torch.equal(pasted[ATTN], clean[ATTN]), "only the named sites change"
    # the pasted ids are the site's output: the same as running the reference there
    _, quantized = site_cache(model, tokens, MLP)
    with model.hooks(fwd_hooks=paste_codes_hooks({MLP: ref[MLP]}, position=2)):
        ids, after = site_cache(model, tokens, MLP)
    torch.testing.assert_close(after[:, 2], code_sum(model, MLP, ref[MLP][:, 2]))
    torch.testing.assert_close(after[:, 3:], quantized[:, 3:])
    with pytest.raises(ValueError, match="outside the sequence"):
        model.run_with_hooks(tokens, fwd_hooks=paste_codes_hooks({MLP: ref[MLP]}, position=99))
    with pytest.raises(ValueError, match="do not fit"):
        model.run_with_hooks(tokens[:1], fwd_hooks=paste_codes_hooks({MLP: ref[MLP]}))
    with pytest.raises(ValueError, match="no sites"):
        paste_codes_hooks({})
    assert all_hooks_removed(model)


def test_ablate_zero_empties_the_slots_where_the_code_is_active(tokens):
    model = make("llama")
    base_ids, base_q = site_cache(model, tokens, MLP)
    a = partly_active_code(base_ids)
    with intervene(model, CodeIntervention.ablate(MLP, a, positions=slice(None, 6))):
        ids, quantized = site_cache(model, tokens, MLP)
    expected = base_ids.clone()
    expected[:, :6][expected[:, :6] == a] = EMPTY_SLOT
    assert torch.equal(ids, expected)
    # Those slots contribute nothing: the output loses exactly code a's vector there.
    codes = model.codebook(MLP).codes.detach()
    hit = torch.zeros_like(base_ids[..., 0], dtype=torch.bool)
    hit[:, :6] = (base_ids[:, :6] == a).any(-1)
    torch.testing.assert_close(quantized - base_q, -codes[:, a] * hit[..., None])
    hooks = ablate_codes(model, MLP, [a], positions=slice(None, 6))
    with model.hooks(fwd_hooks=hooks):
        assert torch.equal(site_cache(model, tokens, MLP)[0], expected)


def test_ablate_disable_lets_the_next_best_code_take_over(tokens):
    model = make()
    layer = model.codebook(MLP)
    layer.disable_codes([15])  # a mask already set must survive the intervention
    saved = layer.disabled.clone()
    base_ids, _ = site_cache(model, tokens, MLP)
    a = partly_active_code(base_ids[..., 1, :])
    iv = CodeIntervention.ablate(MLP, [a], group=1, mode="disable")
    with intervene(model, iv):
        assert layer.disabled[1, a] and layer.disabled[:, 15].all()
        assert layer.disabled[0, a] == saved[0, a]
        ids, quantized = site_cache(model, tokens, MLP)
    assert torch.equal(layer.disabled, saved)
    assert not (ids[..., 1, :] == a).any() and (base_ids[..., 1, :] == a).any()
    assert torch.equal(ids[..., 0, :], base_ids[..., 0, :])  # other group untouched
    # In each cell the other codes keep their order, moving up; the next best fills in.
    for new, old in zip(ids[..., 1, :].tolist(), base_ids[..., 1, :].tolist(), strict=True):
        for cell_new, cell_old in zip(new, old, strict=True):
            kept = [c for c in cell_old if c != a]
            assert cell_new[: len(kept)] == kept
    assert (ids >= 0).all()  # unlike mode="zero", no slot is left empty
    torch.testing.assert_close(quantized, layer.lookup(ids), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="user bug"), intervene(model, iv):
        raise RuntimeError("user bug")
    assert torch.equal(layer.disabled, saved)


# ---------------------------------------------------------------- positions under generation


def changed_positions(pairs, offsets):
    """Absolute positions each forward changed, from (before, after) ids and its offset."""
    out = []
    for (before, after), offset in zip(pairs, offsets, strict=True):
        idx = (before != after).flatten(2).any(-1).any(0).nonzero().flatten() + offset
        out.append(idx.tolist())
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_are_absolute_under_kv_cache_generation(arch):
    model = make(arch)
    name = f"{MLP}.hook_codes"
    prompt = torch.tensor([[10, 1, 2, 3]])
    gen = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    plain = model.generate(prompt, **gen)
    pairs = []

    def before(ids, hook):
        pairs.append([ids.clone()])
        return ids

    def after(ids, hook):
        pairs[-1].append(ids.clone())
        return ids

    iv = CodeIntervention.force(MLP, [4], positions=5, slots="all")
    with model.hooks(fwd_hooks=[(name, before)]):
        with intervene(model, iv, [(name, after)]):
            out = model.generate(prompt, **gen)
            full = model(out)
    # The cache feeds the prompt (positions 0-3), then one token a forward (4, 5, ...).
    offsets = [0, 4, 5, 6, 7, 8, 0]
    assert [p[0].shape[1] for p in pairs] == [4, 1, 1, 1, 1, 1, 10]
    assert changed_positions(pairs, offsets) == [[], [], [5], [], [], [], [5]]
    assert torch.equal(out[:, :6], plain[:, :6])  # tokens up to 5 come before position 5 is seen
    assert torch.equal(out[0, 4:], full[0, 3:-1].argmax(-1))  # same as a full forward
    unforced = model(out)
    torch.testing.assert_close(full[:, :5], unforced[:, :5], rtol=0, atol=0)
    assert not torch.allclose(full[:, 5], unforced[:, 5])
    # Negative positions count from the end of what has been seen: the newest token.
    pairs.clear()
    with model.hooks(fwd_hooks=[(name, before)]):
        with intervene(model, CodeIntervention.force(MLP, 4, positions=-1), [(name, after)]):
            model.generate(prompt, **gen)
    assert changed_positions(pairs, offsets[:-1]) == [[3], [4], [5], [6], [7], [8]]
    assert all_hooks_removed(model)


def test_nested_interventions_keep_tracking_until_the_outer_one_exits(tokens):
    model = make()
    outer = CodeIntervention.force(MLP, 1, positions=0)
    inner = CodeIntervention.force(ATTN, 2, positions=0)
    with intervene(model, outer):
        with intervene(model, inner):
            assert model.original_model._forward_pre_hooks
        assert model.original_model._forward_pre_hooks
        assert (site_cache(model, tokens, MLP)[0][:, 0, :, -1] == 1).all()
        assert not (site_cache(model, tokens, ATTN)[0][:, 0, :, -1] == 2).all()
    assert all_hooks_removed(model)


# ---------------------------------------------------------------- cleanup and modes


def test_everything_is_undone_when_the_body_raises(tokens):
    model = make()
    baseline = model(tokens)
    layer = model.codebook(ATTN)
    saved = layer.disabled.clone()
    items = [
        CodeIntervention.force(MLP, 3),
        CodeIntervention.swap(ATTN, {0: 1}, positions=[1, 2]),
        CodeIntervention.ablate(ATTN, [5, 6], mode="disable"),
        ablate_codes(model, MLP, 2, group=0),
    ]
    with pytest.raises(RuntimeError, match="user bug"), intervene(model, *items):
        assert not torch.equal(model(tokens), baseline)
        raise RuntimeError("user bug")
    assert all_hooks_removed(model) and torch.equal(layer.disabled, saved)
    torch.testing.assert_close(model(tokens), baseline, rtol=0, atol=0)
    # A failure while entering (an unknown raw hook name) undoes the masks already set.
    bad = [("blocks.0.hook_nonsense", lambda x, hook: x)]
    with pytest.raises(KeyError), intervene(model, items[2], bad):
        pass
    assert all_hooks_removed(model) and torch.equal(layer.disabled, saved)


def test_works_in_train_mode_with_gradients(tokens):
    model = make("llama").train()
    with intervene(model, CodeIntervention.force(MLP, 2, positions=[0, 1], slots="all")):
        ids, _ = site_cache(model, tokens, MLP)
        loss = model(tokens, return_type="loss") + model.reconstruction_loss()
        loss.backward()
    assert model.training
    assert (ids[:, :2] == torch.tensor([2, EMPTY_SLOT, EMPTY_SLOT])).all()
    grad = model.codebook(MLP).codes.grad
    assert grad is not None and grad[:, 2].abs().sum() > 0
    assert all_hooks_removed(model)


def test_hooks_never_read_device_values(monkeypatch):
    """Hooks build constants once, then run without any device-to-host copy."""
    model = make()
    ids = torch.randint(0, 16, (2, 7, 4, K))
    hooks = [
        force_codes(model, ATTN, [1, 2], group=3, positions=[1, -2]),
        force_codes(model, ATTN, 1, positions=slice(-5, None, -2), slots="all"),
        swap_codes(model, ATTN, {1: 2, 3: 4}, positions=2),
        ablate_codes(model, ATTN, [1, 2], group=0, positions=slice(2, 6)),
    ]
    warm = [hook(ids, None) for [(_, hook)] in hooks]

    def forbidden(*args, **kwargs):
        raise AssertionError("a hook copied a device value to the host")

    for method in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    for [(_, hook)], first in zip(hooks, warm, strict=True):
        assert torch.equal(hook(ids, None), first)


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def model():
    return make()


BAD = [
    (lambda m: force_codes(m, "blocks.0.hook_resid_post", 1), r"no codebook at site.*valid sites"),
    (lambda m: force_codes(m, MLP, 16), r"codes at blocks.1.hook_mlp_out must be in \[0, 16\)"),
    (lambda m: force_codes(m, MLP, -1), r"must be in \[0, 16\)"),
    (lambda m: swap_codes(m, MLP, {1: 16}), r"swap targets .* must be in \[-1, 16\)"),
    (lambda m: force_codes(m, MLP, 1, group=2), r"group 2 out of range: .* has 2 groups"),
    (lambda m: force_codes(m, MLP, 1, group=-1), r"group must be None or an int >= 0"),
    (lambda m: force_codes(m, MLP, []), r"force at blocks.1.hook_mlp_out got no codes"),
    (lambda m: ablate_codes(m, MLP, torch.tensor([])), r"must be integers"),
    (lambda m: force_codes(m, MLP, [1.0]), r"codes must be integers"),
    (lambda m: force_codes(m, MLP, [1, 2, 3, 4]), r"force got 4 codes but .* only k=3"),
    (lambda m: force_codes(m, MLP, 1, slots="highest"), r"slots must be one of"),
    (lambda m: CodeIntervention(MLP, "steer", (1,)), r"kind must be one of"),
    (lambda m: ablate_codes(m, MLP, 1, mode="mask"), r"mode must be one of"),
    (lambda m: ablate_codes(m, MLP, 1, mode="disable"), r"disable mask.*intervene"),
    (lambda m: CodeIntervention.ablate(MLP, 1, positions=2, mode="disable"), r"positions"),
    (lambda m: CodeIntervention.ablate(MLP, list(range(14)), mode="disable").validate(m), "k=3"),
    (lambda m: CodeIntervention(MLP, "swap", (1,), slots="all"), r"slots applies to force"),
    (lambda m: CodeIntervention(MLP, "force", (1,), targets=(2,)), r"targets applies to swap"),
    (lambda m: CodeIntervention(MLP, "force", (1,), mode="disable"), r"mode applies to ablate"),
    (lambda m: force_codes(m, MLP, 1, positions=[]), r"positions is empty"),
    (lambda m: force_codes(m, MLP, 1, positions=slice(0, 4, 0)), r"step must not be zero"),
    (lambda m: force_codes(m, MLP, 1, positions=slice(0.5, 4)), r"int bounds"),
    (lambda m: force_codes(m, MLP, 1, positions="3"), r"positions must be"),
    (lambda m: swap_codes(m, MLP, ([1, 2], [3])), r"one target per source"),
    (lambda m: swap_codes(m, MLP, ([1, 1], [3, 4])), r"source codes must be distinct"),
    (lambda m: swap_codes(m, MLP, [1, 2, 3]), r"dict \{a: b\} or a \(sources, targets\)"),
    (lambda m: swap_code_sets(m, {MLP: [1]}, {ATTN: [2]}), r"same sites"),
    (lambda m: swap_code_sets(m, {}, {}), r"no sites"),
    (lambda m: swap_code_sets(m, {(MLP,): [1]}, {(MLP,): [2]}), r"site or \(site, group\)"),
    (lambda m: intervene(m, "force").__enter__(), r"CodeInterventions and hook lists"),
]


@pytest.mark.parametrize("call, match", BAD)
def test_bad_inputs_raise_value_errors_naming_the_problem(model, call, match):
    with pytest.raises(ValueError, match=match):
        call(model)
    assert all_hooks_removed(model) and not model.codebook(MLP).disabled.any()


# ---------------------------------------------------------------- positions outside the sequence


@pytest.mark.parametrize(
    "positions, match",
    [
        ([2, 12], r"positions \[12\] are outside the 12-token sequence at blocks.1.hook_mlp_out"),
        (-13, r"positions \[-13\] are outside the 12-token sequence"),
        (slice(12, None), r"positions slice\(12, None, None\) select no token of the 12-token"),
    ],
)
def test_positions_past_a_full_forward_raise(model, tokens, positions, match):
    with pytest.raises(ValueError, match=match):
        model.run_with_hooks(tokens, fwd_hooks=force_codes(model, MLP, 1, positions=positions))
    assert all_hooks_removed(model)
    model.run_with_hooks(tokens, fwd_hooks=force_codes(model, MLP, 1, positions=[0, 11, -12]))


def test_positions_no_forward_reached_raise_when_intervene_exits(model, tokens):
    with pytest.raises(ValueError, match=r"positions \[12\] at .* matched no token: the longest"):
        with intervene(model, CodeIntervention.force(MLP, 1, positions=[3, 12])):
            model(tokens)  # 12 tokens: positions 0-11
    assert all_hooks_removed(model)
    with pytest.raises(ValueError, match=r"positions \[slice\(20, 30, None\)\] at"):
        with intervene(model, CodeIntervention.swap(ATTN, {1: 2}, positions=slice(20, 30))):
            model(tokens)
    # A position ahead of a shorter forward is fine once a later forward reaches it.
    with intervene(model, CodeIntervention.force(MLP, 1, positions=11)):
        model(tokens[:, :5])
        model(tokens)
    # An error in the body is reported as itself, not as unmatched positions.
    with pytest.raises(KeyError), intervene(model, CodeIntervention.force(MLP, 1, positions=50)):
        raise KeyError("the user's own error")
    assert all_hooks_removed(model)


def test_positions_generation_never_reached_raise():
    model = make()
    prompt = torch.tensor([[10, 1, 2, 3]])
    gen = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    with intervene(model, CodeIntervention.force(MLP, 2, positions=5)):
        model.generate(prompt, **gen)  # forwards see tokens 0-3, then 4, then 5
    with pytest.raises(ValueError, match=r"positions \[6\] .* longest sequence .* had 6 tokens"):
        with intervene(model, CodeIntervention.force(MLP, 2, positions=6)):
            model.generate(prompt, **gen)
    assert all_hooks_removed(model)
