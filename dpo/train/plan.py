"""The step plan and batching of a training run: which pairs each optimizer step takes (`Plan`), how a step is
cut into micro-batches (`Batching`, `resolve_batching`), and the learning-rate schedule (`lr_factor`)."""

import math
import os
import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dpo.core.config import TrainConfig
from dpo.core.files import InputError
from dpo.engine.logprobs import split_by_tokens


class Plan:
    """The optimizer steps of a run: plan[step] is a list of example indices, sorted by length within the step
    (micro-batches then carry little padding; a step's update does not depend on how it is split). Each epoch is
    a seeded shuffle of all examples, cut into steps of batch_size (the last one shorter). Computed on demand from
    the epoch's shuffle, so a run of 10^9 steps costs no memory; deterministic, so a resumed run has the same
    plan."""

    def __init__(self, lengths: list, batch_size: int, total_steps: int, seed: int):
        if total_steps and not lengths:
            raise InputError("no training pairs left to train on")
        self.lengths, self.batch_size, self.total_steps, self.seed = lengths, batch_size, total_steps, seed
        self.per_epoch = math.ceil(len(lengths) / batch_size)
        self._epoch = (None, None)  # (epoch, its shuffled order): steps are asked for in order

    def __len__(self) -> int:
        return self.total_steps

    def __getitem__(self, step: int) -> list:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} of a plan of {self.total_steps}")
        epoch, k = divmod(step, self.per_epoch)
        if self._epoch[0] != epoch:
            order = list(range(len(self.lengths)))
            random.Random(f"{self.seed}/epoch{epoch}").shuffle(order)
            self._epoch = (epoch, order)
        return sorted(self._epoch[1][k * self.batch_size:(k + 1) * self.batch_size], key=lambda i: self.lengths[i])

    def pairs(self, start: int = 0) -> int:
        """How many pairs steps start.. to the end hold (each epoch's last step is the short one)."""
        n, b = len(self.lengths), self.batch_size
        return sum(min(b, n - (step % self.per_epoch) * b) for step in range(start, self.total_steps))

    def used(self, start: int) -> list:
        """The example indices of steps start.. to the end, sorted (every example once a whole epoch is left)."""
        if self.total_steps - start >= 2 * self.per_epoch:
            return list(range(len(self.lengths)))
        return sorted({i for step in range(start, self.total_steps) for i in self[step]})


def plan_steps(lengths: list, batch_size: int, total_steps: int, seed: int) -> Plan:
    return Plan(lengths, batch_size, total_steps, seed)


@dataclass
class Batching:
    """How a step's pairs are grouped: a fixed number of pairs per micro-batch, or a token budget (0: none).
    adaptive: CUDA with both batch flags left on auto, where an out-of-memory step is retried in smaller pieces."""
    step_pairs: int
    micro_pairs: int
    max_tokens: int = 0
    adaptive: bool = False

    def split(self, step: list, lengths: list) -> list:
        if self.max_tokens:
            return split_by_tokens(step, lengths, self.max_tokens)
        return [step[j:j + self.micro_pairs] for j in range(0, len(step), self.micro_pairs)]

    def shrink(self, micro_batches: list, lengths: list) -> bool:
        """After micro_batches ran out of memory: with adaptive batching, the token budget becomes half the largest
        one's padded tokens (the step is then redone in smaller micro-batches: the same update), and True; False
        where the batching is fixed or a micro-batch cannot shrink."""
        largest = max(len(mb) * max(lengths[i] for i in mb) for mb in micro_batches)
        if not self.adaptive or largest <= 1:
            return False
        self.max_tokens = largest // 2
        tqdm.write(f"note: out of GPU memory at {largest} tokens per micro-batch; now at most {self.max_tokens} "
                   "(same update, more micro-batches)")
        return True


def resolve_batching(cfg: TrainConfig, device: torch.device) -> Batching:
    """cfg.step_pairs() pairs per step (16 when both batch flags are on auto). Micro-batches: as the flags say;
    with both on auto, 4 pairs on the CPU and, on one CUDA GPU, the whole step at once (split further only if it
    runs out of memory). With several processes, each takes every K-th pair of a step and splits its share alike."""
    step, micro = cfg.step_pairs(), cfg.per_device_train_batch_size
    auto = not micro and not cfg.gradient_accumulation_steps
    if not micro:
        micro = (step if device.type == "cuda" else 4) if auto else step // cfg.gradient_accumulation_steps
    adaptive = auto and device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) == 1
    return Batching(step, micro, cfg.micro_batch_tokens, adaptive=adaptive)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
