"""Tests for the TokFSM data generator and its metrics."""

import pytest
import torch

from codelens.data.fsm import (
    BOS_ID,
    EOS_ID,
    FSMConfig,
    TokFSM,
    first_transition_accuracy,
    next_token_metrics,
    sample_generations,
    transition_accuracy,
)


@pytest.fixture(scope="module")
def fsm() -> TokFSM:
    return TokFSM(FSMConfig())


def test_table_shape_and_determinism(fsm):
    assert fsm.n_digits == 2 and fsm.vocab_size == 12
    assert (fsm.bos_id, fsm.eos_id) == (10, 11)
    assert fsm.transitions.shape == (100, 10)
    assert torch.equal(fsm.transitions, TokFSM(FSMConfig()).transitions)
    assert not torch.equal(fsm.transitions, TokFSM(FSMConfig(seed=7)).transitions)
    # Successors are distinct, and `valid` matches the table.
    assert all(len(set(row.tolist())) == 10 for row in fsm.transitions)
    assert fsm.valid.sum().item() == 100 * 10
    assert fsm.valid.gather(1, fsm.transitions).all()
    assert torch.allclose(fsm.transition_matrix.sum(1), torch.ones(100))


def test_n_digits():
    assert TokFSM(FSMConfig(n_states=10, n_successors=3)).n_digits == 1
    assert TokFSM(FSMConfig(n_states=11, n_successors=3)).n_digits == 2
    assert TokFSM(FSMConfig(n_states=150, n_successors=15)).n_digits == 3


def test_sample_layout_and_validity(fsm):
    gen = torch.Generator().manual_seed(0)
    tokens, states = fsm.sample(64, generator=gen)
    assert tokens.shape == (64, 128) and states.shape == (64, 64)
    assert (tokens[:, 0] == BOS_ID).all()
    assert ((tokens[:, 1:] >= 0) & (tokens[:, 1:] <= 9)).all()
    assert fsm.valid[states[:, :-1], states[:, 1:]].all()
    # 127 digit tokens: 63 full states, and the first digit of the 64th.
    assert torch.equal(tokens[:, 1:], fsm.encode(states)[:, :127])
    again, _ = fsm.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_next_token_probs(fsm):
    tokens, states = fsm.sample(16, generator=torch.Generator().manual_seed(6))
    probs = fsm.next_token_probs(states)
    assert probs.shape == (16, 127, 12)
    assert torch.allclose(probs.sum(-1), torch.ones(16, 127))
    assert (probs.gather(2, tokens[:, 1:, None]) > 0).all()
    assert probs[..., 10:].sum() == 0
    # First state: any of the 100 states, so both digits are uniform.
    assert torch.allclose(
        probs[:, :2], torch.full((16, 2, 12), 0.1).where(torch.arange(12) < 10, 0)
    )
    # Later first digits: share of successors of the previous state with that first digit.
    s = states[0, 0]
    expected = torch.bincount(fsm.transitions[s] // 10, minlength=12).float() / 10
    assert torch.allclose(probs[0, 2], expected)
    # Second digit: uniform over successors with the sampled first digit.
    first = tokens[0, 3]
    n_match = (fsm.transitions[s] // 10 == first).sum()
    assert torch.isclose(probs[0, 3, tokens[0, 4]], 1 / n_match.float())


def test_encode_decode_round_trip():
    fsm3 = TokFSM(FSMConfig(n_states=150, n_successors=15))
    states = torch.tensor([[0, 7, 42, 149], [100, 99, 5, 10]])
    digits = fsm3.encode(states)
    assert digits[0, :6].tolist() == [0, 0, 0, 0, 0, 7]
    assert torch.equal(fsm3.decode(digits), states)
    bad = torch.tensor([[0, 0, BOS_ID, 1, 2, 3, 9, 9, 9]])  # non-digit; 123 ok; 999 >= 150
    assert fsm3.decode(bad).tolist() == [[-1, 123, -1]]


def test_token_states_hand_built(fsm):
    # BOS, 07, 42, 3 (truncated state)
    tokens = torch.tensor([[BOS_ID, 0, 7, 4, 2, 3]])
    state, digit = fsm.token_states(tokens)
    assert state.tolist() == [[-1, 7, 7, 42, 42, -1]]
    assert digit.tolist() == [[-1, 0, 1, 0, 1, 0]]
    state, _ = fsm.token_states(tokens, states=torch.tensor([[7, 42, 31]]))
    assert state.tolist() == [[-1, 7, 7, 42, 42, 31]]
    assert fsm.last_complete_state(tokens).tolist() == [[-1, -1, 7, 7, 42, 42]]


def test_transition_accuracy_exact(fsm):
    tokens, states = fsm.sample(32, generator=torch.Generator().manual_seed(1))
    assert transition_accuracy(fsm, tokens) == 1.0
    s = fsm.transitions[3, 0].item()
    t = fsm.transitions[s, 0].item()
    bad_next = int((~fsm.valid[t]).nonzero()[0])
    seq = torch.tensor([3, s, t, bad_next])
    gen = torch.cat([torch.tensor([BOS_ID]), fsm.encode(seq), torch.tensor([EOS_ID, 1, 5])])
    # states 3 -> s -> t -> bad -> (unreadable) ; pairs: valid, valid, invalid, invalid
    assert transition_accuracy(fsm, gen[None]) == pytest.approx(0.5)
    assert transition_accuracy(fsm, gen[None], n_prompt_states=2) == pytest.approx(1 / 3)
    # Corrupting one digit in a true rollout lowers accuracy.
    corrupted = tokens.clone()
    corrupted[:, 5] = (corrupted[:, 5] + 1) % 10
    assert transition_accuracy(fsm, corrupted) < 1.0


def test_first_transition_accuracy(fsm):
    tokens, _ = fsm.sample(8, generator=torch.Generator().manual_seed(2))
    prompts = tokens[:, :3]
    assert first_transition_accuracy(fsm, prompts, tokens) == 1.0
    broken = tokens.clone()
    broken[:4, 3:5] = EOS_ID
    assert first_transition_accuracy(fsm, prompts, broken) == 0.5


def test_next_token_metrics_and_sampler(fsm):
    tokens, _ = fsm.sample(4, generator=torch.Generator().manual_seed(3))
    logits = torch.nn.functional.one_hot(tokens.roll(-1, dims=1), 12).float() * 50
    m = next_token_metrics(logits, tokens)
    assert m["accuracy"] == 1.0 and m["loss"] < 1e-6
    uniform = next_token_metrics(torch.zeros(4, 128, 12), tokens)
    assert uniform["loss"] == pytest.approx(torch.log(torch.tensor(12.0)).item(), rel=1e-5)

    # An oracle "model" that puts all mass on a valid successor digit by digit.
    def oracle(toks):
        out = torch.full((*toks.shape, 12), -1e4)
        last = fsm.last_complete_state(toks)[:, -1]
        _, digit = fsm.token_states(toks)
        nxt = fsm.encode(fsm.transitions[last, 0][:, None])
        pick = torch.where(digit[:, -1] == fsm.n_digits - 1, nxt[:, 0], nxt[:, 1])
        out[:, -1].scatter_(1, pick[:, None], 0.0)
        return out

    prompts = fsm.prompts(16, generator=torch.Generator().manual_seed(4))
    gens = sample_generations(oracle, prompts, 8, generator=torch.Generator().manual_seed(5))
    assert gens.shape == (16, 3 + 8)
    assert torch.equal(gens[:, :3], prompts)
    assert transition_accuracy(fsm, gens) == 1.0
    assert first_transition_accuracy(fsm, prompts, gens) == 1.0
    greedy = sample_generations(oracle, prompts, 4, temperature=0)
    assert torch.equal(greedy, gens[:, :7])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_states": 1, "n_successors": 1}, r"n_states must be >= 2, got 1"),
        (
            {"n_states": 10, "n_successors": 11},
            r"n_successors must be in \[1, n_states=10\], got 11",
        ),
        ({"n_successors": 0}, r"n_successors must be in \[1, n_states=100\], got 0"),
        ({"seq_len": 2}, r"seq_len must be > n_digits=2 .*, got 2"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokFSM(FSMConfig(**kwargs))


def test_tokenizer(fsm):
    tok = fsm.tokenizer()
    assert len(tok) == 12
    assert tok("0712")["input_ids"] == [BOS_ID, 0, 7, 1, 2]
    assert tok("07 12")["input_ids"] == [BOS_ID, 0, 7, 1, 2]
    assert tok.pad_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    assert tok.decode([BOS_ID, 0, 7], skip_special_tokens=True) == "07"
    assert tok.init_kwargs["name_or_path"] == "tokfsm" and tok.init_kwargs["add_bos_token"]
