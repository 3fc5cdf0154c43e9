"""TokFSM: a random token finite state machine and metrics for models trained on it.

Each of ``n_states`` states has ``n_successors`` distinct successor states, chosen uniformly at
random (seeded) and taken with equal probability. A state is written as ``n_digits`` decimal
digit tokens (``n_digits = len(str(n_states - 1))``). A rollout is ``<bos>`` followed by the
digits of consecutive states, truncated to ``seq_len`` tokens.

Token ids: digits ``0``-``9`` are ids 0-9, ``<bos>`` is 10, ``<eos>`` is 11.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_ID = 10
EOS_ID = 11
VOCAB_SIZE = 12

LogitsFn = Callable[[Int[torch.Tensor, "batch pos"]], Float[torch.Tensor, "batch pos vocab"]]


@dataclass(frozen=True)
class FSMConfig:
    """Settings of a TokFSM (defaults follow the paper)."""

    n_states: int = 100
    n_successors: int = 10
    seq_len: int = 128
    seed: int = 42


class TokFSM:
    """A random finite state machine whose states are written as digit tokens."""

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    vocab_size: int = VOCAB_SIZE

    def __init__(self, config: FSMConfig | None = None):
        config = FSMConfig() if config is None else config
        if config.n_states < 2:
            raise ValueError(f"n_states must be >= 2, got {config.n_states}")
        if not 1 <= config.n_successors <= config.n_states:
            raise ValueError(
                f"n_successors must be in [1, n_states={config.n_states}], "
                f"got {config.n_successors}"
            )
        self.config = config
        self.n_digits = len(str(config.n_states - 1))
        if config.seq_len <= self.n_digits:
            raise ValueError(
                f"seq_len must be > n_digits={self.n_digits} (BOS plus one full state), "
                f"got {config.seq_len}"
            )
        gen = torch.Generator().manual_seed(config.seed)
        # A random permutation per row; its first n_successors entries are the successors.
        perm = torch.rand(config.n_states, config.n_states, generator=gen).argsort(dim=1)
        self.transitions: Int[torch.Tensor, "n_states n_successors"] = (
            perm[:, : config.n_successors].sort(dim=1).values
        )
        valid = torch.zeros(config.n_states, config.n_states, dtype=torch.bool)
        valid.scatter_(1, self.transitions, True)
        self.valid: Bool[torch.Tensor, "n_states n_states"] = valid
        self._powers = 10 ** torch.arange(self.n_digits - 1, -1, -1)

    def __repr__(self) -> str:
        return f"TokFSM({self.config}, n_digits={self.n_digits})"

    @property
    def n_states(self) -> int:
        """Number of FSM states."""
        return self.config.n_states

    @property
    def seq_len(self) -> int:
        """Tokens per rollout, BOS included."""
        return self.config.seq_len

    @property
    def states_per_seq(self) -> int:
        """States whose digits (possibly only some) appear in one rollout."""
        return -(-(self.seq_len - 1) // self.n_digits)

    @property
    def transition_matrix(self) -> Float[torch.Tensor, "n_states n_states"]:
        """True next-state probabilities ``P[s, t]``."""
        return self.valid.float() / self.config.n_successors

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[Int[torch.Tensor, "batch seq_len"], Int[torch.Tensor, "batch n_seq_states"]]:
        """Sample ``batch`` rollouts: ``(tokens, states)``; the last state may be truncated."""
        n = self.states_per_seq
        dev = generator.device if generator is not None else torch.device("cpu")
        trans = self.transitions.to(dev)
        states = torch.empty(batch, n, dtype=torch.long, device=dev)
        states[:, 0] = torch.randint(0, self.n_states, (batch,), generator=generator, device=dev)
        choice = torch.randint(
            0, self.config.n_successors, (batch, n - 1), generator=generator, device=dev
        )
        for t in range(1, n):
            states[:, t] = trans[states[:, t - 1], choice[:, t - 1]]
        bos = torch.full((batch, 1), self.bos_id, dtype=torch.long, device=dev)
        tokens = torch.cat([bos, self.encode(states)], dim=1)[:, : self.seq_len]
        return tokens, states

    def next_token_probs(
        self, states: Int[torch.Tensor, "batch n_seq_states"]
    ) -> Float[torch.Tensor, "batch seq_len-1 vocab"]:
        """Exact distribution of each target ``tokens[:, 1:]`` given its prefix.

        ``states`` come from ``sample``. Training on these soft targets has the same optimum as
        training on sampled tokens, with much less gradient noise.
        """
        b, n = states.shape
        dev = states.device
        all_digits = self.encode(torch.arange(self.n_states, device=dev)[:, None])  # [N, d]
        cand = torch.ones(b, n, self.n_states, dtype=torch.bool, device=dev)
        cand[:, 1:] = self.valid.to(dev)[states[:, :-1]]
        cur = all_digits[states]  # [b, n, d]
        out = []
        for j in range(self.n_digits):
            same_prefix = (all_digits[None, None, :, :j] == cur[:, :, None, :j]).all(-1)
            weight = (cand & same_prefix).float()
            dist = weight @ F.one_hot(all_digits[:, j], self.vocab_size).float()
            out.append(dist / dist.sum(-1, keepdim=True))
        probs = torch.stack(out, 2).reshape(b, n * self.n_digits, self.vocab_size)
        return probs[:, : self.seq_len - 1]

    def prompts(
        self, batch: int, n_prompt_states: int = 1, generator: torch.Generator | None = None
    ) -> Int[torch.Tensor, "batch prompt_len"]:
        """BOS followed by the first ``n_prompt_states`` states of fresh rollouts."""
        plen = 1 + n_prompt_states * self.n_digits
        if n_prompt_states < 1 or plen > self.seq_len:
            raise ValueError(f"need 1 <= n_prompt_states and {plen=} <= seq_len={self.seq_len}")
        tokens, _ = self.sample(batch, generator=generator)
        return tokens[:, :plen]

    def encode(self, states: Int[torch.Tensor, "*batch T"]) -> Int[torch.Tensor, "*batch T*d"]:
        """Digit tokens of ``states`` (no BOS), most significant digit first."""
        powers = self._powers.to(states.device)
        digits = (states.long().unsqueeze(-1) // powers) % 10
        return digits.flatten(-2)

    def decode(
        self, digit_tokens: Int[torch.Tensor, "*batch T*d"]
    ) -> Int[torch.Tensor, "*batch T"]:
        """States of digit groups; -1 where a group has a non-digit or is not a state."""
        d = self.n_digits
        if digit_tokens.shape[-1] % d:
            raise ValueError(f"last dimension {digit_tokens.shape[-1]} not a multiple of {d}")
        groups = digit_tokens.long().unflatten(-1, (-1, d))
        ok = ((groups >= 0) & (groups <= 9)).all(-1)
        value = (groups.clamp(0, 9) * self._powers.to(groups.device)).sum(-1)
        ok &= value < self.n_states
        return torch.where(ok, value, torch.full_like(value, -1))

    def token_states(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        states: Int[torch.Tensor, "batch n_seq_states"] | None = None,
    ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
        """Per token: the state its digit belongs to and which digit it is (-1, -1 at BOS).

        ``tokens`` must be laid out as BOS + digit groups (position 0 is BOS). The state of a
        group cut off by the end of ``tokens`` is -1 unless ``states`` (from ``sample``) is given.
        """
        batch, pos = tokens.shape
        d = self.n_digits
        dev = tokens.device
        p = torch.arange(pos, device=dev)
        group = (p - 1).clamp(min=0) // d
        digit = torch.where(p == 0, -1, (p - 1) % d)
        n_groups = -(-(pos - 1) // d)
        if states is not None:
            group_state = states[:, :n_groups].to(dev).long()
        else:
            n_full = (pos - 1) // d
            group_state = torch.full((batch, n_groups), -1, dtype=torch.long, device=dev)
            group_state[:, :n_full] = self.decode(tokens[:, 1 : 1 + n_full * d])
        state = group_state[:, group] if n_groups else torch.full_like(tokens, -1)
        state = torch.where(p == 0, -1, state)
        return state, digit.expand(batch, pos).clone()

    def last_complete_state(
        self, tokens: Int[torch.Tensor, "batch pos"]
    ) -> Int[torch.Tensor, "batch pos"]:
        """Per token: the most recent state whose last digit is at or before it (-1 if none).

        At the last digit of a state this is that state, i.e. the state the FSM is in when the
        model predicts the first digit of the next state.
        """
        state, digit = self.token_states(tokens)
        p = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        end_idx = torch.where(digit == self.n_digits - 1, p, -1).cummax(dim=1).values
        last = state.gather(1, end_idx.clamp(min=0))
        return torch.where(end_idx >= 0, last, -1)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A character-level HF tokenizer over the 12-token vocabulary that prepends BOS.

        Whitespace is ignored. Unknown characters map to ``<bos>`` (not ``<eos>``) so that
        TransformerLens detects "prepends BOS, does not append EOS" from ``encode("a")``.
        """
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {str(i): i for i in range(10)} | {"<bos>": BOS_ID, "<eos>": EOS_ID}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<bos>"))
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), "isolated")]
        )
        core.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<eos>",
            add_bos_token=True,
            add_eos_token=False,
            model_max_length=self.seq_len,
        )
        tok.init_kwargs["name_or_path"] = "tokfsm"
        tok.init_kwargs["add_bos_token"] = True
        return tok


def next_token_metrics(
    logits: Float[torch.Tensor, "batch pos vocab"], tokens: Int[torch.Tensor, "batch pos"]
) -> dict[str, float]:
    """Cross-entropy and argmax accuracy predicting ``tokens[:, 1:]``, BOS targets ignored."""
    pred = logits[:, :-1].float()
    target = tokens[:, 1:]
    mask = target != BOS_ID
    loss = F.cross_entropy(pred[mask], target[mask])
    acc = (pred.argmax(-1) == target)[mask].float().mean()
    return {"loss": loss.item(), "accuracy": acc.item()}


def _pair_validity(
    fsm: TokFSM, generations: Int[torch.Tensor, "batch pos"]
) -> Bool[torch.Tensor, "batch n_pairs"]:
    """Validity of each consecutive pair of complete states after BOS."""
    d = fsm.n_digits
    n_full = (generations.shape[1] - 1) // d
    states = fsm.decode(generations[:, 1 : 1 + n_full * d])
    prev, nxt = states[:, :-1], states[:, 1:]
    ok = (prev >= 0) & (nxt >= 0)
    valid = fsm.valid.to(generations.device)[prev.clamp(min=0), nxt.clamp(min=0)]
    return ok & valid


def transition_accuracy(
    fsm: TokFSM, generations: Int[torch.Tensor, "batch pos"], n_prompt_states: int = 0
) -> float:
    """Share of consecutive complete-state pairs that are valid transitions.

    ``generations`` is BOS + prompt + generated digits. Pairs whose both states lie in the first
    ``n_prompt_states`` states are skipped (default 0: count every pair). Unreadable groups
    (non-digits, or values >= n_states) count as invalid.
    """
    pairs = _pair_validity(fsm, generations)[:, max(n_prompt_states - 1, 0) :]
    if pairs.numel() == 0:
        raise ValueError("generations hold fewer than two complete states")
    return pairs.float().mean().item()


def first_transition_accuracy(
    fsm: TokFSM,
    prompts: Int[torch.Tensor, "batch prompt_len"],
    generations: Int[torch.Tensor, "batch pos"],
) -> float:
    """Share of generations whose first generated state is a valid successor of the prompt's last.

    ``prompts`` is BOS + whole states; ``generations`` starts with the prompt (as returned by
    ``sample_generations``) and holds at least one more full state.
    """
    d = fsm.n_digits
    plen = prompts.shape[1]
    if (plen - 1) % d or plen < 1 + d:
        raise ValueError(f"prompts must be BOS + a whole number (>= 1) of {d}-digit states")
    if generations.shape[1] < plen + d:
        raise ValueError("generations must include the prompt and at least one generated state")
    last = fsm.decode(prompts[:, plen - d : plen])
    first = fsm.decode(generations[:, plen : plen + d])
    ok = (last >= 0) & (first >= 0)
    valid = ok & fsm.valid.to(prompts.device)[last.clamp(min=0), first.clamp(min=0)]
    return valid.float().mean().item()


@torch.no_grad()
def sample_generations(
    logits_fn: LogitsFn,
    prompts: Int[torch.Tensor, "batch prompt_len"],
    n_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[torch.Tensor, "batch prompt_len+n_new"]:
    """Sample continuations from any ``logits_fn`` (full re-run per token, no KV cache).

    ``temperature == 0`` means greedy decoding. Returns prompt + new tokens.
    """
    tokens = prompts
    for _ in range(n_new_tokens):
        logits = logits_fn(tokens)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, nxt.to(tokens.dtype)], dim=1)
    return tokens
