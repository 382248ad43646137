"""Reference log-probs of preference pairs, read from and added to the reference cache: what `dpo audit` uses, with
the same cache key as `dpo train` (model, tokenizer, max length, precision, device type), so the two share entries.
dpo train computes them in fp32 whatever its training precision (dpo/precision.py), and so does `dpo audit` unless
asked for bf16.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo import models, refcache
from dpo.logprobs import Logps, logprobs_in_batches, tokenize_pairs
from dpo.pairs import read_pairs
from dpo.precision import reference_precision
from dpo.sources import ChatTemplate

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

    @classmethod
    def load(cls, spec: str, max_length: int, precision: str, device: str, cache_dir: str, threads: int = 0):
        """The model `spec` in the precision of `dpo train`'s reference log-probs (auto: fp32), with its cache file."""
        device = models.pick_device(device)
        models.set_threads(threads)
        precision = reference_precision(precision)
        tokenizer = models.load_tokenizer(spec)
        model = models.load_model(spec, dtype=torch.float32, device=device)
        return cls.of(model, tokenizer, spec, max_length, precision, cache_dir)

    @classmethod
    def of(cls, model, tokenizer, spec: str, max_length: int, precision: str, cache_dir: str):
        """A scorer around an fp32 model already loaded (`dpo train`'s policy before its first step)."""
        if precision == "bf16" and next(model.parameters()).dtype != torch.bfloat16:
            model = copy.deepcopy(model).to(torch.bfloat16)
        device = next(model.parameters()).device
        key = refcache.cache_key(models.model_id(spec), tokenizer, max_length, precision, device.type)
        return cls(model, tokenizer, max_length, precision, refcache.cache_path(cache_dir, key), key, models.slug(spec))

    def read(self, path) -> list:
        return read_pairs(path, ChatTemplate(self.slug, self.tokenizer))  # conversations: this model's template

    def logprobs(self, pairs: list, desc: str) -> Logps:
        """(chosen [N], rejected [N]) summed log-probs of every pair, through the cache."""
        examples = tokenize_pairs(self.tokenizer, pairs, self.max_length)
        budget = token_budget(next(self.model.parameters()).device)

        def compute(exs):
            return logprobs_in_batches(self.model, exs, budget, self.tokenizer.pad_token_id)

        return refcache.reference_logprobs(compute, pairs, examples, range(len(pairs)), self.cache_path, self.key,
                                           desc).logps
