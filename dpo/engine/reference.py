"""Reference log-probs of preference pairs, read from and added to the reference cache: what `dpo audit` uses
(`Scorer`), and `dpo train` before its first step (`reference_pass`), with the same cache key (model, tokenizer, max
length, precision, device type, --append-eos, --truncation-mode), so the two share entries. dpo train computes them
in fp32 whatever its training precision (dpo/engine/precision.py), and so does `dpo audit` unless asked for bf16.
A LoRA policy scores them with its adapters off (dpo/engine/lora.py): the reference is its base model, whose entries it
shares with full fine-tuning runs.
"""

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from dpo.core import models
from dpo.core.truncation import DEFAULT_TRUNCATION
from dpo.data.pairs import read_pairs
from dpo.data.sources import ChatTemplate
from dpo.engine import lora, refcache
from dpo.engine.distributed import Dist
from dpo.engine.logprobs import Logps, Tokenized, logprobs_in_batches, tokenize_pairs
from dpo.engine.precision import reference_precision

REFERENCE_TOKENS = {"cuda": 32768, "cpu": 4096}  # padded tokens per forward in reference and validation passes


def token_budget(device: torch.device) -> int:
    return REFERENCE_TOKENS["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class Scorer:
    model: torch.nn.Module  # in the precision it scores in (a bf16 copy for bf16)
    tokenizer: object
    max_length: int
    precision: str
    cache_path: Path
    key: dict
    slug: str = "model"
    append_eos: bool = False  # responses end with the EOS token (--append-eos)
    truncation: str = DEFAULT_TRUNCATION  # how a pair longer than max_length is cut (--truncation-mode)

    @classmethod
    def load(cls, spec: str, max_length: int, precision: str, device: str, cache_dir: str, threads: int = 0,
             append_eos: bool = False, truncation: str = DEFAULT_TRUNCATION):
        """The model `spec` in the precision of `dpo train`'s reference log-probs (auto: fp32), with its cache file."""
        device = models.pick_device(device)
        models.set_threads(threads)
        precision = reference_precision(precision)
        tokenizer = models.load_tokenizer(spec)
        model = models.load_model(spec, dtype=torch.float32, device=device)
        return cls.of(model, tokenizer, spec, max_length, precision, cache_dir, append_eos, truncation)

    @classmethod
    def of(cls, model, tokenizer, spec: str, max_length: int, precision: str, cache_dir: str,
           append_eos: bool = False, truncation: str = DEFAULT_TRUNCATION):
        """A scorer around an fp32 model already loaded (`dpo train`'s policy before its first step)."""
        if precision == "bf16" and next(model.parameters()).dtype != torch.bfloat16:
            model = copy.deepcopy(model).to(torch.bfloat16)
        device = next(model.parameters()).device
        key = refcache.cache_key(models.model_id(spec), tokenizer, max_length, precision, device.type, append_eos,
                                 truncation)
        return cls(model, tokenizer, max_length, precision, refcache.cache_path(cache_dir, key), key, models.slug(spec),
                   append_eos, truncation)

    def read(self, path) -> list:
        return read_pairs(path, ChatTemplate(self.slug, self.tokenizer))  # conversations: this model's template

    def cached(self, pairs: list, examples: list, needed, desc: str) -> refcache.RefLogps:
        """Log-probs of pairs[i] for i in needed (NaN elsewhere; examples: the pairs tokenized), read from the cache
        where it has them, the rest scored in large no-grad batches (a LoRA model with its adapters off) and added
        to it."""
        budget = token_budget(next(self.model.parameters()).device)

        def compute(exs):
            with lora.adapters_off(self.model):
                return logprobs_in_batches(self.model, exs, budget, self.tokenizer.pad_token_id)

        return refcache.reference_logprobs(compute, pairs, examples, needed, self.cache_path, self.key, desc)

    def logprobs(self, pairs: list, desc: str) -> Logps:
        """(chosen [N], rejected [N]) summed log-probs of every pair, through the cache."""
        examples = tokenize_pairs(self.tokenizer, pairs, self.max_length, self.append_eos, self.truncation)
        return self.cached(pairs, examples, range(len(pairs)), desc).logps


class ReferencePass(NamedTuple):
    """What `reference_pass` returns."""
    ref: Logps  # the training pairs', [N] each on the scorer's device (NaN where not needed), or None
    val_ref: Logps  # the validation pairs' (rank 0), or None
    computed: int  # training pairs scored here (not found in the cache)
    seconds: float


def reference_pass(scorer: Scorer, ranks: Dist, train: Tokenized, needed, val: Tokenized) -> ReferencePass:
    """`dpo train`'s reference log-probs: of the training pairs `needed` (None: none, the reference runs alongside
    training) and of the validation pairs (rank 0 only), through the cache. With several processes each rank first
    fills its share of the cache, then every rank reads all of it."""
    t0 = time.perf_counter()
    ref, computed, val_ref = None, 0, None
    if needed is not None:
        if ranks.world > 1:
            computed = scorer.cached(*train, ranks.share(needed), "reference log-probs").computed
            ranks.barrier()
        ref, computed_now = scorer.cached(*train, needed, "reference log-probs")
        ref, computed = ref.to(next(scorer.model.parameters()).device), computed + computed_now
    if val.examples and ranks.main:  # validation runs on rank 0
        val_ref = scorer.cached(*val, range(len(val.pairs)), "reference log-probs (val)").logps
    return ReferencePass(ref, val_ref, computed, time.perf_counter() - t0)
