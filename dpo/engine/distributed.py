"""Several training processes (`torchrun --nproc_per_node K -m dpo train ...`): where this process stands among
them (`Dist`), joining the process group, the DistributedDataParallel wrapper of the model, and stopping together.

Each rank takes every K-th pair of each step (`Dist.share`), accumulates its micro-batches without synchronizing
(`accumulating`: DistributedDataParallel's `no_sync`), and the gradients are all-reduced once, in the step's last
backward. The loss is scaled so that the update equals the single-process one (`accumulate` in dpo/train/train.py). The
reference pass is sharded (each rank fills its share of the cache, then all read it); rank 0 alone writes logs,
metrics and checkpoints. A stop (Ctrl-C, SIGTERM: `StopSignals`) that any process gets is `agreed` on, so every
process stops after the same step. gloo on the CPU, nccl on GPUs; with one process (WORLD_SIZE unset or 1) every
helper here is a no-op.
"""

import contextlib
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dpo.core import models
from dpo.core.files import InputError
from dpo.engine.logprobs import pair_logprobs


@dataclass
class Dist:
    """This process's place among the training processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK), and its
    device."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> None:
        """tensor, in place, becomes its sum over the processes."""
        if self.world > 1:
            dist.all_reduce(tensor)


def env_int(name: str, default, low: int, high=None, why: str = "") -> int:
    """An integer environment variable that torchrun sets, in low..high (high excluded); unset: default (None:
    required). Anything else is one InputError naming the variable and its value."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value >= high):
        shown = "unset" if text is None else f"{text!r}"
        bound = f"from {low} to {high - 1}" if high is not None else f"of at least {low}"
        raise InputError(f"environment variable {name} is {shown}: expected an integer {bound}{why} (torchrun sets "
                         "WORLD_SIZE, RANK and LOCAL_RANK; unset all three for one process)") from None
    return value


def init_distributed(device_name: str) -> Dist:
    """This process's Dist (the device --device names; with CUDA, the GPU of its local rank); joins the process
    group when started by torchrun with more than one process. The torchrun variables are checked first."""
    world = env_int("WORLD_SIZE", 1, 1, why=" (the number of processes)")
    device = models.pick_device(device_name)
    if world == 1:
        return Dist(device=device)
    rank = env_int("RANK", None, 0, world, f" (this process's rank among WORLD_SIZE={world})")
    local_rank = env_int("LOCAL_RANK", 0, 0, why=" (this process's rank on its machine)")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as e:  # MASTER_ADDR / MASTER_PORT missing, the rendezvous timed out
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"WORLD_SIZE={world}, RANK={rank}: cannot join the other training processes ({first}); "
                             "start several processes with torchrun (or unset WORLD_SIZE for one)") from None
    return Dist(rank, world, local_rank, device)


class PairScorer(torch.nn.Module):
    """`pair_logprobs` as a module, so that DistributedDataParallel sees (and synchronizes) the forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return pair_logprobs(self.model, batch)


def pair_scorer(model, ranks: Dist) -> torch.nn.Module:
    """PairScorer(model), wrapped in DistributedDataParallel with several processes."""
    scorer = PairScorer(model)
    if ranks.world > 1:
        device = ranks.device
        scorer = DistributedDataParallel(scorer, device_ids=[device.index] if device.type == "cuda" else None)
    return scorer


def accumulating(scorer, ranks: Dist, last: bool):
    """The context of a micro-batch's forward and backward: with several processes, every micro-batch but a step's
    last accumulates its gradients without synchronizing (the last backward all-reduces them all)."""
    return scorer.no_sync() if ranks.world > 1 and not last else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- stopping together

class StopSignals:
    """Ctrl-C, or SIGTERM (e.g. Slurm's time limit), while training: the loop checkpoints after the step and stops;
    a second one aborts at once. The previous handlers are restored on exit."""

    def __init__(self, announce: bool):
        self.requested, self.announce, self.previous = False, announce, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            tqdm.write(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")


def agreed(ranks: Dist, flag: bool) -> bool:
    """True when any process says so (every process then stops after the same step)."""
    if ranks.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=ranks.device)
    dist.all_reduce(t)
    return bool(t.item())
