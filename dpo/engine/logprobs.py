"""Summed log-probabilities of continuations after a prefix: one engine for training (`pair_logprobs`) and for
scoring (`dpo eval`, `score.score`).

A request (a prefix and its continuations) is one packed row (`pack`):

    [prefix + common | rest 0 | rest 1 | ...]      (each rest without its last token)

common is the longest common token prefix of the continuations that leaves each at least its last token; rest j is
the remainder of continuation j. Each rest restarts its position ids after prefix + common and attends only to
prefix + common and to itself (`block_causal_mask`), so every continuation gets the log-probs of its own forward
pass over prefix + continuation, while the shared tokens are computed once. A scored token is a (row, col, target,
slot): vocabulary logits are computed only at those columns (`gather_logprobs`), and a common token is listed once
per continuation, counting for each.

A training pair is the request (prompt, [chosen, rejected]), slot 2i its chosen and 2i + 1 its rejected response.
An `mc` pair (" 2" vs " 0", one token with GPT-2's tokenizer, "Ġ" + digit with SmolLM2's) has rests of one token:
its row is prompt + the common tokens, both last tokens scored at its final column, a plain causal row. A batch
uses the [B, 1, T, T] block mask only when some row has two rests with input tokens; otherwise it passes a [B, T]
padding mask (none without padding) and default position ids, so attention can use the fast SDPA kernels.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm

from dpo.core.files import InputError
from dpo.core.truncation import DEFAULT_TRUNCATION, TRUNCATIONS

# ---------------------------------------------------------------------------------------------------------------
# Packing

@dataclass
class Request:
    """Continuations (token-id lists) to score after one shared prefix (token ids)."""
    prefix: list
    continuations: list


@dataclass
class Packed:
    tokens: list  # prefix + common, then each continuation's rest without its last token
    positions: list  # position ids: each rest restarts after prefix + common
    segments: list  # 0 for prefix + common, j + 1 for the rest of continuation j
    cols: list  # for every scored token: the column whose next-token distribution scores it,
    targets: list  # the token,
    owner: list  # and the continuation it counts for (a common token is listed once per continuation)


def common_length(continuations) -> int:
    """How many leading tokens all continuations share, leaving each at least its last token (which is only ever a
    target, never an input)."""
    k, shortest = 0, min(len(c) for c in continuations)
    while k < shortest - 1 and all(c[k] == continuations[0][k] for c in continuations):
        k += 1
    return k


def packed_length(request: Request) -> int:
    """len(pack(request).tokens), without packing."""
    k = common_length(request.continuations)
    return len(request.prefix) + k + sum(len(c) - k - 1 for c in request.continuations)


def pack(request: Request) -> Packed:
    """The request as one row (see the module docstring)."""
    prefix, conts = request.prefix, request.continuations
    if not prefix or not conts or not all(conts):
        raise ValueError("a packed request needs a non-empty prefix and non-empty continuations")
    k = common_length(conts)
    shared = len(prefix) + k
    tokens, positions, segments = list(prefix) + list(conts[0][:k]), list(range(shared)), [0] * shared
    cols, targets, owner = [], [], []
    for j, cont in enumerate(conts):
        rest, start = cont[k:], len(tokens)
        tokens += rest[:-1]
        positions += range(shared, shared + len(rest) - 1)
        segments += [j + 1] * (len(rest) - 1)
        # the common tokens and rest[0] are scored along the shared part, the other rest tokens in its segment
        cols += list(range(len(prefix) - 1, shared)) + list(range(start, start + len(rest) - 1))
        targets += cont
        owner += [j] * len(cont)
    return Packed(tokens, positions, segments, cols, targets, owner)


def block_causal_mask(segments: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T] of packed rows (segments [B, T]: 0 prefix, j + 1 continuation j,
    -1 padding): token q sees token k <= q when k is in the prefix or in q's segment. Padding sees the prefix
    and padding, so no row is empty; real tokens never see padding (it comes last)."""
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k == 0) | (k == q))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def collate_packed(packed: list, pad_id: int = 0) -> dict:
    """A batch for `packed_logprobs`: right-padded rows plus, for every scored token, its (row, col, target) and
    slot = the index of its continuation among all continuations of the batch, in order. block: some row has two
    rests with input tokens (it needs `block_causal_mask`); tokens: real input tokens; padded_tokens: B x T."""
    width = max(len(p.tokens) for p in packed)
    batch = {"input_ids": torch.full((len(packed), width), pad_id, dtype=torch.long),
             "position_ids": torch.zeros((len(packed), width), dtype=torch.long),
             "segments": torch.full((len(packed), width), -1, dtype=torch.long)}
    rows, cols, targets, slots, base = [], [], [], [], 0
    for b, p in enumerate(packed):
        n = len(p.tokens)
        batch["input_ids"][b, :n] = torch.tensor(p.tokens)
        batch["position_ids"][b, :n] = torch.tensor(p.positions)
        batch["segments"][b, :n] = torch.tensor(p.segments)
        rows += [b] * len(p.cols)
        cols += p.cols
        targets += p.targets
        slots += [base + j for j in p.owner]
        base += max(p.owner) + 1
    for key, values in (("rows", rows), ("cols", cols), ("targets", targets), ("slots", slots)):
        batch[key] = torch.tensor(values, dtype=torch.long)
    batch["attention_mask"] = (batch["segments"] >= 0).long()
    batch["block"] = any(len(set(p.segments) - {0}) > 1 for p in packed)
    batch["n_slots"] = base
    batch["tokens"] = sum(len(p.tokens) for p in packed)
    batch["padded_tokens"] = len(packed) * width
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Model math

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


def packed_logprobs(model, batch: dict, dtype=torch.float32) -> torch.Tensor:
    """Summed log-probs of every slot of a `collate_packed` batch, [n_slots] in dtype. The block mask has the
    model's dtype. Without it, no mask and default position ids at all: a plain causal forward, exact for the real
    tokens because padding only ever follows them (right padding), and the fastest attention kernels apply."""
    param = next(model.parameters())
    device = param.device
    if batch["block"]:
        mask = block_causal_mask(batch["segments"].to(device), param.dtype)
        positions = batch["position_ids"].to(device)
    else:
        mask, positions = None, None
    hidden = hidden_states(model, batch["input_ids"].to(device), mask, positions)
    index = (batch["rows"].to(device), batch["cols"].to(device))
    token_logps = gather_logprobs(model, hidden, index, batch["targets"].to(device))
    sums = torch.zeros(batch["n_slots"], dtype=dtype, device=device)
    return sums.index_add(0, batch["slots"].to(device), token_logps.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs

@dataclass
class Example:
    prompt: list  # token ids (cut to fit max_length as --truncation-mode says)
    chosen: list
    rejected: list
    flipped: bool
    truncated: bool  # prompt or response was cut

    @property
    def request(self) -> Request:
        return Request(self.prompt, [self.chosen, self.rejected])

    @property
    def length(self) -> int:
        """Tokens of its packed row: what this pair costs in a forward pass."""
        return packed_length(self.request)


class Tokenized(NamedTuple):
    """Preference pairs and their tokenized `Example`s, index for index."""
    pairs: list
    examples: list


def text_ids(tokenizer, texts: list, append_eos: bool = False) -> list:
    """Token ids of texts (no special tokens), each followed by the tokenizer's EOS token with append_eos (what
    TRL's DPOTrainer does to responses)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if not append_eos:
        return ids
    if tokenizer.eos_token_id is None:
        raise InputError("--append-eos: this tokenizer has no EOS token")
    return [r + [tokenizer.eos_token_id] for r in ids]




def tokenize_pairs(tokenizer, pairs, max_length: int, append_eos: bool = False,
                   truncation: str = DEFAULT_TRUNCATION) -> list:
    """Prompt and responses are tokenized separately (no special tokens) and concatenated; append_eos: each
    response ends with the EOS token (`text_ids`). When prompt + the longer response exceeds max_length, the pair
    is cut as `truncation` says (`TRUNCATIONS`: keep_end, the default, cuts the prompt from the left and a response
    longer than max_length - 1 from the right). So prompt + either response fits max_length, and every position id
    of the packed row stays below max_length (the row itself may be longer: its two rests each restart after the
    common part)."""
    cut = TRUNCATIONS[truncation].cut
    prompts = text_ids(tokenizer, [p["prompt"] for p in pairs])
    chosen, rejected = (text_ids(tokenizer, [p[k] for p in pairs], append_eos) for k in ("chosen", "rejected"))
    examples = []
    for pair, full_p, full_c, full_r in zip(pairs, prompts, chosen, rejected):
        if not full_p or not full_c or not full_r:
            raise ValueError(f"pair {pair.get('item')}: the prompt or a response tokenizes to nothing")
        p, c, r = cut(full_p, full_c, full_r, max_length)
        truncated = (len(p), len(c), len(r)) != (len(full_p), len(full_c), len(full_r))
        examples.append(Example(p, c, r, bool(pair.get("flipped")), truncated))
    return examples


def tokenize_apart(tokenizer, pairs: list, max_length: int, path, append_eos: bool = False,
                   truncation: str = DEFAULT_TRUNCATION) -> list:
    """`tokenize_pairs`, refusing a --max-length that cuts the two responses of a pair to the same tokens (such a
    pair is a tie: it trains nothing and counts half in every accuracy), naming the smallest that keeps every pair
    apart (`Truncation.need`: with keep_end responses are cut to max_length - 1 tokens, so a pair whose token lists
    first differ at index d needs d + 2)."""
    examples = tokenize_pairs(tokenizer, pairs, max_length, append_eos, truncation)
    same = [i for i, ex in enumerate(examples) if ex.chosen == ex.rejected]
    need = 0
    for i in same:
        prompt, chosen, rejected = text_ids(tokenizer, [pairs[i]["prompt"]]) + text_ids(
            tokenizer, [pairs[i]["chosen"], pairs[i]["rejected"]], append_eos)
        if chosen == rejected:
            raise InputError(f"{path}: pair {i}: chosen and rejected are different texts with the same tokens")
        d = next((d for d, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        need = max(need, TRUNCATIONS[truncation].need(prompt, d))
    if same:
        raise InputError(f"{path}: --max-length {max_length} cuts chosen and rejected to the same tokens in "
                         f"{len(same)} of {len(examples)} pairs (the first: pair {same[0]}), which then train "
                         f"nothing: use --max-length {need} or more")
    return examples


def collate(examples, pad_id: int) -> dict:
    """A batch for `pair_logprobs`: one packed row per pair (slots 2i: chosen, 2i + 1: rejected), n pairs."""
    return {**collate_packed([pack(ex.request) for ex in examples], pad_id), "n": len(examples)}


class Logps(NamedTuple):
    """Summed log-probs of each pair's chosen and rejected response, [N] each (a policy's or the reference's)."""
    chosen: torch.Tensor
    rejected: torch.Tensor

    def take(self, index) -> "Logps":
        """The pairs at `index` (a tensor or list of pair indices)."""
        return Logps(self.chosen[index], self.rejected[index])

    def to(self, device) -> "Logps":
        return Logps(self.chosen.to(device), self.rejected.to(device))

    def detach(self) -> "Logps":
        return Logps(self.chosen.detach(), self.rejected.detach())


def response_lengths(examples, device=None) -> Logps:
    """Each pair's chosen and rejected response length in tokens, [N] each (float32): what a per-token loss divides
    their log-probs by."""
    return Logps(*(torch.tensor([len(getattr(ex, side)) for ex in examples], dtype=torch.float32, device=device)
                   for side in ("chosen", "rejected")))


def pair_logprobs(model, batch: dict) -> Logps:
    """Summed log-probs of the chosen and rejected responses, shapes [B] and [B] (float32)."""
    sums = packed_logprobs(model, batch).view(batch["n"], 2)
    return Logps(sums[:, 0], sums[:, 1])


def split_by_tokens(indices: list, lengths: list, max_tokens: int) -> list:
    """Consecutive groups of length-sorted indices whose padded size (rows x longest row) stays within max_tokens
    (a longer single row is a group of its own)."""
    groups, current = [], []
    for i in indices:
        if current and (len(current) + 1) * max(lengths[j] for j in current + [i]) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


def logprobs_in_batches(model, examples, max_tokens: int, pad_id: int, progress: str = "") -> Logps:
    """Chosen and rejected log-probs of every example under `model`, without gradients, in length-sorted batches
    of at most max_tokens padded tokens; `progress`: a progress bar of the pairs with that name (stderr)."""
    chosen, rejected = torch.zeros(len(examples)), torch.zeros(len(examples))
    lengths = [ex.length for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(examples), desc=progress, unit="pair", leave=False,
                                      disable=not progress) as bar:
        for idx in split_by_tokens(order, lengths, max_tokens):
            c, r = pair_logprobs(model, collate([examples[i] for i in idx], pad_id))
            chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
            bar.update(len(idx))
    model.train(was_training)
    return Logps(chosen, rejected)
