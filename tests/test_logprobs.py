import pytest
import torch
from conftest import tiny_model

from dpo.engine import logprobs
from dpo.engine.logprobs import Example, collate, pack, pair_logprobs, tokenize_pairs

PAIRS = [  # mc: one-token responses
    {"prompt": 'Context: "A man sits on a roof. he"\nBest Continuation:', "chosen": " 3", "rejected": " 1"},
    {"prompt": "The boy", "chosen": " 0", "rejected": " 2", "flipped": True},
    {"prompt": "A woman walks to the water and then the dog runs on the ball", "chosen": " 1", "rejected": " 0"},
]
LONG = [  # completion: multi-token responses
    {"prompt": "A man sits on a roof. he", "chosen": " runs into the water.", "rejected": " jumps"},
    {"prompt": "The boy", "chosen": " smiles then walks on the roof and the ball", "rejected": " sits."},
    {"prompt": "Camera: a dog runs on the ball then jumps into the water and smiles", "chosen": " a",
     "rejected": " the man walks"},
    {"prompt": "The woman", "chosen": " the man walks on the roof", "rejected": " the man runs into the water"},
]
A, B, C, D = 17, 30, 31, 60
EDGE = [  # token ids: responses that share leading tokens, or where one is a prefix of the other
    Example([5, 9, 12], [A, B], [A, B, C], False, False),
    Example([7, 8, 9, 10], [A, B, C], [A, B], False, False),
    Example([5, 6], [A, B, C, D], [A, B, D], False, False),
    Example([9, 8, 7], [A, B, C, D], [A, C, D], False, False),  # two rests with inputs: the block mask
    Example([11], [A], [B, C, D], False, False),
    Example([12, 13], [A, B], [A, C], False, False),  # SmolLM2's mc answers: "Ġ" + digit
    Example([14, 15, 16], [A, B], [A, B], False, False),  # identical tokens (different texts can give them)
]


def naive_logprob(model, prompt, response):
    """One full forward over prompt + response, log_softmax over all logits, summed at the response's tokens."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = logits.log_softmax(-1)[len(prompt) - 1: -1]
    return logp.gather(-1, torch.tensor(response)[:, None]).sum()


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_tokenizer):
    return tiny_model(request.param, len(tiny_tokenizer), seed=3).eval()


@pytest.fixture
def examples(tiny_tokenizer):
    return {"mc": tokenize_pairs(tiny_tokenizer, PAIRS, max_length=256),
            "completion": tokenize_pairs(tiny_tokenizer, LONG, max_length=256), "edge": EDGE}


@pytest.mark.parametrize("kind", ["mc", "completion", "edge", "mixed"])
def test_packed_pairs_match_separate_forward_passes(model, examples, kind):
    exs = sum(examples.values(), []) if kind == "mixed" else examples[kind]  # mixed: lengths differ, padding
    batch = collate(exs, pad_id=0)
    assert batch["block"] == (kind != "mc") and batch["n"] == len(exs)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch)
        for i, ex in enumerate(exs):
            assert chosen[i].item() == pytest.approx(naive_logprob(model, ex.prompt, ex.chosen).item(), abs=1e-5)
            assert rejected[i].item() == pytest.approx(naive_logprob(model, ex.prompt, ex.rejected).item(), abs=1e-5)
    assert chosen.dtype == rejected.dtype == torch.float32


def test_gradients_match_separate_forward_passes(model, examples):
    exs = examples["mc"][:2] + examples["completion"] + EDGE
    chosen, rejected = pair_logprobs(model, collate(exs, pad_id=0))
    packed = torch.autograd.grad((chosen - rejected).sum(), list(model.parameters()))
    naive = sum(naive_logprob(model, ex.prompt, ex.chosen) - naive_logprob(model, ex.prompt, ex.rejected)
                for ex in exs)
    for got, want in zip(packed, torch.autograd.grad(naive, list(model.parameters()))):
        assert (got - want).abs().max().item() < 1e-5  # (gradients up to ~10 here)


def test_every_response_token_is_scored_once_for_its_slot():
    for ex in EDGE:
        p = pack(ex.request)
        assert len(p.tokens) == len(p.positions) == len(p.segments) == ex.length
        for j, response in enumerate((ex.chosen, ex.rejected)):
            mine = [(col, t) for col, t, o in zip(p.cols, p.targets, p.owner) if o == j]
            assert [t for _, t in mine] == response
            full = ex.prompt + response  # the token before each target, and its position, as in the full row
            for m, (col, _) in enumerate(mine):
                at = len(ex.prompt) + m - 1
                assert (p.tokens[col], p.positions[col], p.segments[col] in (0, j + 1)) == (full[at], at, True)


def test_a_response_that_is_a_prefix_of_the_other():
    """chosen [A, B], rejected [A, B, C]: A is common and counts for both; B is chosen's last token, so it is
    scored but not an input of the shared part; rejected's rest [B, C] inputs B."""
    p = pack(EDGE[0].request)
    assert p.tokens == [5, 9, 12, A, B] and p.positions == [0, 1, 2, 3, 4] and p.segments == [0, 0, 0, 0, 2]
    assert list(zip(p.cols, p.targets, p.owner)) == [(2, A, 0), (3, B, 0), (2, A, 1), (3, B, 1), (4, C, 1)]


def test_mc_rows_are_plain_causal_rows(examples, tiny_tokenizer, monkeypatch):
    """One-token responses: the row is prompt + chosen[:-1], and attention gets no mask at all (right padding
    follows every real token, so plain causal attention is exact) and default position ids, never the
    [B, 1, T, T] block mask (fast SDPA kernels); the values are checked against naive forwards above."""
    seen, real = [], logprobs.hidden_states

    def spy(model, input_ids, attention_mask, position_ids):
        seen.append((attention_mask, position_ids))
        return real(model, input_ids, attention_mask, position_ids)

    monkeypatch.setattr(logprobs, "hidden_states", spy)
    model = tiny_model("gpt2", len(tiny_tokenizer))
    mc = examples["mc"]
    batch = collate(mc, pad_id=0)
    assert batch["input_ids"].shape == (3, max(len(ex.prompt) for ex in mc))
    assert batch["tokens"] == sum(len(ex.prompt) for ex in mc) and batch["padded_tokens"] == batch["input_ids"].numel()
    with torch.no_grad():
        pair_logprobs(model, batch)
        pair_logprobs(model, collate(mc[:1], pad_id=0))
        pair_logprobs(model, collate([EDGE[2], EDGE[4]], pad_id=0))  # one rest with inputs a row: causal
        pair_logprobs(model, collate(examples["completion"], pad_id=0))
    (mask, pos), (none, pos1), (mask2, pos2), (block, pos3) = seen
    assert mask is None and pos is None
    assert none is None and pos1 is None and mask2 is None and pos2 is None
    assert block.dim() == 4 and pos3 is not None


def test_lengths_and_token_counts(examples):
    exs = sum(examples.values(), [])
    batch = collate(exs, pad_id=0)
    assert [ex.length for ex in exs] == [len(pack(ex.request).tokens) for ex in exs]
    assert batch["tokens"] == sum(ex.length for ex in exs) == int(batch["attention_mask"].sum())
    assert batch["padded_tokens"] == len(exs) * max(ex.length for ex in exs) == batch["input_ids"].numel()
    # the completion pairs cost less than the two rows [prompt + chosen], [prompt + rejected] they replace
    assert all(ex.length < 2 * len(ex.prompt) + len(ex.chosen) + len(ex.rejected) for ex in examples["completion"])


def test_truncation_keeps_every_position_below_max_length(tiny_tokenizer):
    """The prompt is cut from the left so that prompt + the longer response fits; the packed row may be longer
    than max_length (two rests), but its position ids are not: a model with max_length positions scores it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    max_length = 12
    (ex,) = tokenize_pairs(tiny_tokenizer, LONG[3:], max_length=max_length)
    full = tiny_tokenizer(LONG[3]["prompt"] * 5, add_special_tokens=False)["input_ids"]
    (long,) = tokenize_pairs(tiny_tokenizer, [{**LONG[3], "prompt": LONG[3]["prompt"] * 5}], max_length=max_length)
    assert long.truncated and len(long.prompt) + max(len(long.chosen), len(long.rejected)) == max_length
    assert long.prompt == full[-len(long.prompt):] and not ex.truncated
    p = pack(long.request)
    assert len(p.tokens) > max_length and max(p.positions) < max_length
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=max_length, n_embd=32, n_layer=2,
                                       n_head=2)).eval()
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, collate([long], pad_id=0))
        assert chosen.item() == pytest.approx(naive_logprob(model, long.prompt, long.chosen).item(), abs=1e-5)
        assert rejected.item() == pytest.approx(naive_logprob(model, long.prompt, long.rejected).item(), abs=1e-5)
    (cut,) = tokenize_pairs(tiny_tokenizer, [{**LONG[1], "chosen": LONG[1]["chosen"] * 4}], max_length=max_length)
    assert cut.truncated and len(cut.chosen) == max_length - 1 and len(cut.prompt) == 1
    (short,) = tokenize_pairs(tiny_tokenizer, PAIRS[1:2], max_length=256)
    assert not short.truncated and short.flipped


def test_truncation_modes_keep_the_end_by_default_or_the_start(tiny_tokenizer):
    """--truncation-mode (TRL's names): keep_end, the default (so committed studies keep their numbers), cuts the
    prompt from the left; keep_start keeps the prompt's start and cuts the responses from the right, and cuts a
    prompt that fills max_length from the right so that each response keeps its first token. Either way prompt +
    either response fits max_length; a pair that fits is the same in both."""
    max_length = 12
    long_prompt = {**LONG[3], "prompt": LONG[3]["prompt"] * 12}
    ids = {k: tiny_tokenizer(long_prompt[k], add_special_tokens=False)["input_ids"] for k in long_prompt}
    (default,) = tokenize_pairs(tiny_tokenizer, [long_prompt], max_length=max_length)
    (end,) = tokenize_pairs(tiny_tokenizer, [long_prompt], max_length=max_length, truncation="keep_end")
    (start,) = tokenize_pairs(tiny_tokenizer, [long_prompt], max_length=max_length, truncation="keep_start")
    assert default == end and end.prompt == ids["prompt"][-len(end.prompt):]
    assert len(ids["prompt"]) > max_length and start.truncated and start.prompt == ids["prompt"][: max_length - 1]
    assert start.chosen == ids["chosen"][:1] and start.rejected == ids["rejected"][:1]
    short_prompt = {**LONG[1], "chosen": LONG[1]["chosen"] * 4}
    full = tiny_tokenizer(short_prompt["chosen"], add_special_tokens=False)["input_ids"]
    (start,) = tokenize_pairs(tiny_tokenizer, [short_prompt], max_length=max_length, truncation="keep_start")
    (end,) = tokenize_pairs(tiny_tokenizer, [short_prompt], max_length=max_length)
    prompt = tiny_tokenizer("The boy", add_special_tokens=False)["input_ids"]
    assert start.prompt == prompt and start.chosen == full[: max_length - len(prompt)]  # the prompt kept whole
    assert end.prompt == prompt[-1:] and end.chosen == full[: max_length - 1]  # the response's start, its end cut
    for ex in (start, end):
        assert len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) <= max_length
    assert tokenize_pairs(tiny_tokenizer, LONG, 256, truncation="keep_start") == tokenize_pairs(tiny_tokenizer, LONG,
                                                                                                256)


def test_a_max_length_that_makes_a_tie_names_the_length_each_mode_needs(tiny_tokenizer):
    """keep_end cuts responses to max_length - 1 tokens (a pair differing at token d needs d + 2); keep_start
    cuts them to what the prompt leaves (the prompt's tokens + d + 1)."""
    pair = {"prompt": "The boy and the dog", "chosen": " the man walks on the roof", "rejected": " the man runs"}
    prompt, chosen, rejected = (tiny_tokenizer(pair[k], add_special_tokens=False)["input_ids"] for k in pair)
    d = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
    assert d >= 1
    with pytest.raises(logprobs.InputError, match=f"use --max-length {d + 2} or more"):
        logprobs.tokenize_apart(tiny_tokenizer, [pair], d + 1, "p.json")
    need = len(prompt) + d + 1
    with pytest.raises(logprobs.InputError, match=f"use --max-length {need} or more"):
        logprobs.tokenize_apart(tiny_tokenizer, [pair], need - 1, "p.json", truncation="keep_start")
    assert logprobs.tokenize_apart(tiny_tokenizer, [pair], need, "p.json", truncation="keep_start")


def test_append_eos_ends_each_response_with_eos_and_only_then(tiny_tokenizer, model):
    """--append-eos (TRL's DPOTrainer): each response's tokens are its text's, then EOS, scored like any other token
    (the mc pairs' rows then need the block mask); off, the tokens are the text's alone. Cutting a long response
    cuts its EOS too, and a tokenizer without EOS is an input error."""
    eos = tiny_tokenizer.eos_token_id
    plain = tokenize_pairs(tiny_tokenizer, PAIRS + LONG, max_length=256)
    with_eos = tokenize_pairs(tiny_tokenizer, PAIRS + LONG, max_length=256, append_eos=True)
    for ex, ex_eos, pair in zip(plain, with_eos, PAIRS + LONG):
        for side in ("chosen", "rejected"):
            text = tiny_tokenizer(pair[side], add_special_tokens=False)["input_ids"]
            assert getattr(ex, side) == text and getattr(ex_eos, side) == text + [eos]
        assert ex_eos.prompt == ex.prompt
    batch = collate(with_eos[:len(PAIRS)], pad_id=0)
    assert batch["block"]
    with torch.no_grad():
        chosen, _ = pair_logprobs(model, batch)
    assert chosen[0].item() == pytest.approx(naive_logprob(model, with_eos[0].prompt, with_eos[0].chosen).item(),
                                             abs=1e-5)
    long = {**LONG[1], "chosen": LONG[1]["chosen"] * 4}
    (cut,) = tokenize_pairs(tiny_tokenizer, [long], max_length=12, append_eos=True)
    assert cut.truncated and len(cut.chosen) == 11 and cut.chosen[-1] != eos
    assert cut.rejected[-1] == eos


def test_append_eos_needs_a_tokenizer_with_eos(tiny_tokenizer):
    from dpo.core.files import InputError

    class NoEos:  # the tokenizer, without an EOS token
        eos_token_id = None

        def __call__(self, *args, **kw):
            return tiny_tokenizer(*args, **kw)

    assert tokenize_pairs(NoEos(), PAIRS, max_length=256) == tokenize_pairs(tiny_tokenizer, PAIRS, max_length=256)
    with pytest.raises(InputError, match="--append-eos: this tokenizer has no EOS token"):
        tokenize_pairs(NoEos(), PAIRS, max_length=256, append_eos=True)
