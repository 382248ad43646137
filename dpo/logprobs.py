"""Tokenized preference pairs, batches, and summed response log-probabilities.

Vocabulary logits are computed only at the positions that score a response token, never for every prompt
position. Two batch layouts share one forward function:
- shared: chosen and rejected differ only in their last token (the `mc` format: " 2" vs " 0", one token with
  GPT-2's tokenizer, "Ġ" + digit with SmolLM2's): one row per pair, prompt + the common tokens, both last
  tokens scored at its final position;
- concat: rows [prompt + chosen] for every pair, then [prompt + rejected]; one forward for all of them.
"""

from dataclasses import dataclass

import torch


@dataclass
class Example:
    prompt: list  # token ids (cut from the left to fit max_length)
    chosen: list
    rejected: list
    flipped: bool
    truncated: bool  # prompt or response was cut

    @property
    def shared(self) -> bool:
        """Chosen and rejected differ only in their last token: one forward scores both."""
        return len(self.chosen) == len(self.rejected) and self.chosen[:-1] == self.rejected[:-1]

    @property
    def length(self) -> int:
        """Tokens this pair costs in a forward pass."""
        if self.shared:
            return len(self.prompt) + len(self.chosen) - 1
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def tokenize_pairs(tokenizer, pairs, max_length: int) -> list:
    """Prompt and responses are tokenized separately (no special tokens) and concatenated. When
    prompt + the longer response exceeds max_length, the prompt is cut from the left (the question at the end
    survives); a response longer than max_length - 1 is cut from the right."""
    def ids(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts, chosen, rejected = (ids([p[k] for p in pairs]) for k in ("prompt", "chosen", "rejected"))
    examples = []
    for pair, p, full_c, full_r in zip(pairs, prompts, chosen, rejected):
        if not full_c or not full_r:
            raise ValueError(f"pair {pair.get('item')}: a response tokenizes to nothing")
        c, r = full_c[: max_length - 1], full_r[: max_length - 1]
        room = max_length - max(len(c), len(r))
        truncated = len(p) > room or len(c) < len(full_c) or len(r) < len(full_r)
        examples.append(Example(p[-room:] if len(p) > room else p, c, r, bool(pair.get("flipped")),
                                truncated))
    return examples


def _right_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return input_ids, mask


def collate(examples, pad_id: int) -> dict:
    """A batch for `pair_logprobs`: right-padded rows plus, for every scored token, its (row, position,
    target, slot); slot i < B sums into chosen[i], slot B + i into rejected[i]."""
    n = len(examples)
    rows, positions, targets, slots = [], [], [], []
    if all(ex.shared for ex in examples):
        seqs = [ex.prompt + ex.chosen[:-1] for ex in examples]
        for i, ex in enumerate(examples):
            start = len(ex.prompt) - 1
            for j, token in enumerate(ex.chosen):  # common tokens count for both; the last differs
                rows += [i, i]
                positions += [start + j, start + j]
                targets += [token, ex.rejected[j]]
                slots += [i, n + i]
    else:
        seqs = [ex.prompt + ex.chosen for ex in examples] + [ex.prompt + ex.rejected for ex in examples]
        responses = [ex.chosen for ex in examples] + [ex.rejected for ex in examples]
        for row, (ex, resp) in enumerate(zip(examples + examples, responses)):
            start = len(ex.prompt) - 1  # the position whose next-token distribution scores resp[0]
            rows += [row] * len(resp)
            positions += range(start, start + len(resp))
            targets += resp
            slots += [row] * len(resp)
    input_ids, attention_mask = _right_pad(seqs, pad_id)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "attention_mask": attention_mask, "rows": as_long(rows),
            "positions": as_long(positions), "targets": as_long(targets), "slots": as_long(slots), "n": n,
            "tokens": int(attention_mask.sum())}


def hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Final hidden states [B, T, H] of an HF causal LM (after its last norm), without the vocabulary projection.
    attention_mask: a [B, T] padding mask or a [B, 1, T, T] additive float mask (0: attend, very negative: not),
    which transformers passes to eager and sdpa attention as is. model.base_model is GPT-2's `transformer`,
    Llama's `model`."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state


def gather_logprobs(model, hidden, index, targets) -> torch.Tensor:
    """log p(targets[n] | hidden[index][n]), float32 [N]: the output embedding (lm_head) applied only to the
    selected states. index selects N positions of hidden's first two dims: a (rows, cols) pair of index tensors
    (a position may repeat) or a [B, T] bool mask (row-major order). log_softmax, as lm-evaluation-harness computes
    it (`logits - logsumexp` is a little more accurate in fp32, but differs from the harness by ~1e-4 per ending)."""
    logits = model.get_output_embeddings()(hidden[index]).float()
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def pair_logprobs(model, batch: dict):
    """Summed log-probs of the chosen and rejected responses, shapes [B] and [B] (float32)."""
    device = next(model.parameters()).device
    hidden = hidden_states(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    index = (batch["rows"].to(device), batch["positions"].to(device))
    token_logps = gather_logprobs(model, hidden, index, batch["targets"].to(device))
    sums = torch.zeros(2 * batch["n"], dtype=torch.float32, device=device)
    sums = sums.index_add(0, batch["slots"].to(device), token_logps)
    return sums[: batch["n"]], sums[batch["n"]:]
