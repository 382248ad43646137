import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from dpo.logprobs import collate, pair_logprobs, tokenize_pairs

PAIRS = [
    {"prompt": 'Context: "A man sits on a roof. he"\nBest Continuation:', "chosen": " 3", "rejected": " 1"},
    {"prompt": "The boy", "chosen": " 0", "rejected": " 2", "flipped": True},
    {"prompt": "A woman walks to the water and then the dog runs on the ball", "chosen": " 1", "rejected": " 0"},
]
LONG = [
    {"prompt": "A man sits on a roof. he", "chosen": " runs into the water.", "rejected": " jumps"},
    {"prompt": "The boy", "chosen": " smiles then walks on the roof and the ball", "rejected": " sits."},
    {"prompt": "Camera: a dog runs on the ball then jumps into the water and smiles", "chosen": " a",
     "rejected": " the man walks"},
]


def naive_logprob(model, prompt, response, left_pad=0, pad_id=0):
    """One sequence at a time: full logits everywhere, log-softmax, sum over the response tokens."""
    ids = torch.tensor([[pad_id] * left_pad + prompt + response])
    mask = torch.tensor([[0] * left_pad + [1] * (len(prompt) + len(response))])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[0]
    logp = F.log_softmax(logits.double(), -1)
    start = left_pad + len(prompt)
    return sum(logp[start + j - 1, t].item() for j, t in enumerate(response))


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_tokenizer):
    return tiny_model(request.param, len(tiny_tokenizer), seed=3).eval()


@pytest.mark.parametrize("pairs", [PAIRS, LONG], ids=["one-token", "multi-token"])
def test_batched_logprobs_match_naive(model, tiny_tokenizer, pairs):
    examples = tokenize_pairs(tiny_tokenizer, pairs, max_length=256)
    assert all(ex.shared for ex in examples) == (pairs is PAIRS)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, collate(examples, tiny_tokenizer.pad_token_id))
    for i, ex in enumerate(examples):
        for got, response in ((chosen[i], ex.chosen), (rejected[i], ex.rejected)):
            assert got.item() == pytest.approx(naive_logprob(model, ex.prompt, response), abs=1e-5)
            left = naive_logprob(model, ex.prompt, response, left_pad=5)  # left padding gives the same
            assert got.item() == pytest.approx(left, abs=1e-5)


def test_shared_position_equals_concatenated(model, tiny_tokenizer):
    examples = tokenize_pairs(tiny_tokenizer, PAIRS, max_length=256)
    multi = tokenize_pairs(tiny_tokenizer, LONG[:1], max_length=256)
    with torch.no_grad():
        shared = pair_logprobs(model, collate(examples, 0))
        concat = pair_logprobs(model, collate(examples + multi, 0))  # a multi-token pair forces concat
    assert collate(examples, 0)["input_ids"].shape[0] == 3 and collate(examples + multi, 0)["input_ids"].shape[0] == 8
    assert torch.allclose(shared[0], concat[0][:3], atol=1e-5) and torch.allclose(shared[1], concat[1][:3], atol=1e-5)


def test_shared_path_with_common_prefix_tokens(model, tiny_tokenizer):
    """SmolLM2 spells " 2" as "Ġ" + "2": the common tokens are scored once per row and counted for both."""
    from dpo.logprobs import Example

    examples = [Example([5, 9, 12, 40], [17, 30], [17, 31], False, False),
                Example([7, 8], [3, 4, 60], [3, 4, 61], False, False)]
    assert all(ex.shared for ex in examples)
    batch = collate(examples, 0)
    assert batch["input_ids"].shape == (2, 5)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, batch)
    for i, ex in enumerate(examples):
        assert chosen[i].item() == pytest.approx(naive_logprob(model, ex.prompt, ex.chosen), abs=1e-5)
        assert rejected[i].item() == pytest.approx(naive_logprob(model, ex.prompt, ex.rejected), abs=1e-5)


def test_truncation_cuts_prompt_from_the_left(tiny_tokenizer):
    (ex,) = tokenize_pairs(tiny_tokenizer, LONG[2:], max_length=8)
    full = tiny_tokenizer(LONG[2]["prompt"], add_special_tokens=False)["input_ids"]
    assert ex.truncated and len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) == 8
    assert ex.prompt == full[-len(ex.prompt):]
    (short,) = tokenize_pairs(tiny_tokenizer, PAIRS[1:2], max_length=256)
    assert not short.truncated and short.flipped
