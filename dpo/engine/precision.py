"""Which number format a run computes in: `--precision fp32 | bf16 | auto`, decided in one place.

bf16 (`dpo train`): forward and backward of the training steps in a bf16 copy of the weights (`Weights`); the fp32
master weights, their gradients and the AdamW state stay fp32. What the studies compare stays fp32 in either precision:
the reference log-probs (scored by the fp32 policy before its first step, so fp32 and bf16 runs share reference
cache entries, `REFERENCE`) and the validation margins (scored with the fp32 master weights, tie `TIE["fp32"]`).
A bf16 summed log-prob of a ~11-token response differs from the fp32 one by ~0.2 nats (SD; a pair's margin h by
~0.28), more than the margins a study compares (BENCHMARKS.md, "bf16 and the science"), so neither of them is
computed in bf16 by dpo train.

auto: bf16 on CUDA. On the CPU, bf16 where its matrix products are measurably faster than fp32, fp32 elsewhere:
a CPU whose flags show no native bf16 instructions (`BF16_FLAGS`: AVX512-BF16, AMX-BF16, Arm BF16) gets fp32 at
once (there a bf16 product is 6-60x slower); otherwise a probe of under a second times a model-shaped product in
both (`probe`) and bf16 is chosen when it is at least `FASTER` times as fast. The choice is made once per machine
and cached in <cache>/precision/cpu-<key>.json (the key: CPU model, its bf16-related flags, torch's CPU
capability and version; written atomically, a damaged file is ignored and rewritten). DPO_CPU_PRECISION=fp32|bf16
pins it (a study spread over CPUs of several kinds; the tests). `config.json` records the choice and why;
`python -m dpo.engine.precision` prints this CPU's kind and choice.
"""

import copy
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dpo.core import models
from dpo.core.files import InputError, atomic_write_json, read_json

TIE = {"fp32": 1e-4, "bf16": 2e-2}  # |h| (nats) at or below which chosen and rejected count as a tie
REFERENCE = "fp32"  # the precision of every reference log-prob dpo train computes and caches
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo flags of native bf16 matrix arithmetic
FLAGS_SHOWN = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "bf16", "sve")
FASTER = 1.3  # bf16 must multiply matrices at least this many times as fast as fp32 to be chosen
PROBE_SHAPE = (1024, 576, 1536)  # rows x in -> out: SmolLM2-135M's MLP, a micro-batch of ~1000 tokens
CACHE_FORMAT = 1
ENV = "DPO_CPU_PRECISION"


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for a --precision value on a device (auto: `choose`)."""
    return choose(name, device)["precision"]


def choose(name: str, device: torch.device) -> dict:
    """{"precision": "fp32" | "bf16", "requested": name, "reason": why, ...}: what config.json records."""
    if name not in ("auto", "fp32", "bf16"):
        raise InputError(f"--precision {name!r}: expected auto, fp32 or bf16")
    if name != "auto":
        return {"precision": name, "requested": name, "reason": "asked for"}
    if device.type == "cuda":
        return {"precision": "bf16", "requested": name, "reason": "CUDA: bf16 compute copy, fp32 master weights"}
    return {"requested": name, **cpu_choice()}


def recorded(choice: dict) -> dict:
    """What a training run's config.json says about precision: the choice and why, the precision of the reference
    log-probs and of the validation pass (fp32), and the tie tolerances of the training steps and of validation."""
    return {"precision": choice["precision"], "precision_choice": choice, "reference_precision": REFERENCE,
            "validation_precision": "fp32", "tie_tolerance": TIE[choice["precision"]],
            "val_tie_tolerance": TIE["fp32"]}


def reference_precision(name: str) -> str:
    """The precision `dpo audit` scores reference log-probs in: as asked, auto: what dpo train caches (fp32)."""
    return REFERENCE if name == "auto" else name


# --------------------------------------------------------------------------------------------- the compute copy

class Weights:
    """A policy's fp32 master weights (`policy`: what the optimizer updates and checkpoints save) and the model
    forward and backward run in (`model`): the policy itself in fp32, or a bf16 copy of it. That is the usual
    mixed-precision scheme with one weight cast per step (`sync`, after every update), instead of autocast
    re-casting every weight in every forward (and recompute); the gradients of each micro-batch are added to the
    master gradients in fp32 (`collect_grads`), so accumulation is exact."""

    def __init__(self, policy: torch.nn.Module, bf16: bool):
        self.policy = policy
        self.model = copy.deepcopy(policy).to(torch.bfloat16) if bf16 else policy
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def copied(self) -> bool:
        return self.model is not self.policy

    @torch.no_grad()
    def sync(self) -> None:
        """Master (fp32) weights -> the bf16 compute copy, after every update."""
        if self.copied:
            torch._foreach_copy_(self.model_params, self.params)

    @torch.no_grad()
    def collect_grads(self) -> None:
        """bf16 gradients of a micro-batch -> added to the fp32 master gradients (exact accumulation in fp32)."""
        if not self.copied:
            return
        for master, p in zip(self.params, self.model_params):
            if p.grad is not None:
                master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
                p.grad = None

    def clear_grads(self) -> None:
        for p in self.params + self.model_params:
            p.grad = None


# ------------------------------------------------------------------------------------------------ the CPU's choice

def cpu_choice() -> dict:
    """The CPU's auto precision: pinned by DPO_CPU_PRECISION, else this machine's cached choice, else decided
    now (`decide`) and cached."""
    pinned = os.environ.get(ENV, "")
    if pinned:
        if pinned not in ("fp32", "bf16"):
            raise InputError(f"{ENV}={pinned!r}: expected fp32 or bf16")
        return {"precision": pinned, "reason": f"pinned by {ENV}={pinned}"}
    facts = cpu_facts()
    path = cache_file(facts)
    cached = read_cached(path, facts)
    if cached:
        return {**cached, "cpu": facts, "cache": str(path)}
    choice = decide(facts, probe)
    try:
        atomic_write_json(path, {"format": CACHE_FORMAT, "facts": facts, **choice}, indent=1)
    except (OSError, InputError):  # a read-only or full cache folder: decide again next time
        pass
    return {**choice, "cpu": facts, "cache": str(path)}


def cpu_facts() -> dict:
    """What the choice depends on: the CPU model, its bf16-related flags (None: /proc/cpuinfo unreadable),
    torch's CPU capability (the widest vector instructions its kernels use) and version."""
    name, flags = None, None
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and name is None:
            name = value
        if key in ("flags", "Features") and flags is None:  # x86, Arm
            flags = sorted(set(value.split()) & set(FLAGS_SHOWN))
    return {"cpu": name or platform.processor() or platform.machine(), "flags": flags,
            "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def native_bf16(facts: dict):
    """True: the flags show native bf16 matrix instructions; False: they show none; None: unknown."""
    if facts["flags"] is None:
        return None
    return any(f in facts["flags"] for f in BF16_FLAGS)


def cpu_kind(facts: dict) -> str:
    """The processor kind figures are reported per: native bf16, no native bf16 (or unknown)."""
    return {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}[native_bf16(facts)]


def decide(facts: dict, probe_fn) -> dict:
    """{"precision", "reason", "probe"} from the CPU's facts and, unless its flags rule bf16 out, a probe."""
    if native_bf16(facts) is False:
        return {"precision": "fp32", "probe": None,
                "reason": f"no native bf16 instructions ({' / '.join(BF16_FLAGS[:2])} not among the CPU's flags; "
                          f"torch CPU capability {facts['capability']}): bf16 products would be several times slower"}
    figures = probe_fn()
    ratio = figures["bf16_gflops"] / figures["fp32_gflops"]
    faster = ratio >= FASTER
    return {"precision": "bf16" if faster else "fp32", "probe": figures,
            "reason": f"bf16 matrix products {ratio:.2f}x as fast as fp32 on this CPU "
                      f"({figures['bf16_gflops']:.0f} vs {figures['fp32_gflops']:.0f} GFLOP/s; bf16 needs "
                      f">= {FASTER}x)"}


def probe(shape=PROBE_SHAPE, repeats: int = 3) -> dict:
    """GFLOP/s of a model-shaped product (x [rows, in] times a weight [out, in], as nn.Linear does) in fp32 and
    bf16, the best of `repeats` after one warm-up call, on torch's current threads. bf16 stops after its warm-up
    when that alone took 3x the fp32 time (no native bf16: the probe then costs well under a second)."""
    rows, n_in, n_out = shape
    flop = 2 * rows * n_in * n_out
    out, t_fp32 = {}, None
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(rows, n_in, generator=gen).to(dtype), torch.randn(n_out, n_in, generator=gen).to(dtype)
        times = [_timed(x, w)]  # warm-up
        if not (name == "bf16" and times[0] > 3 * t_fp32):
            times = [_timed(x, w) for _ in range(repeats)]
        best = min(times)
        t_fp32 = best if name == "fp32" else t_fp32
        out[f"{name}_gflops"] = flop / best / 1e9
    return {**out, "shape": list(shape), "threads": torch.get_num_threads()}


def _timed(x, w) -> float:
    t0 = time.perf_counter()
    torch.nn.functional.linear(x, w)
    return time.perf_counter() - t0


def cache_file(facts: dict) -> Path:
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return Path(models.CACHE_DIR) / "precision" / f"cpu-{digest}.json"


def read_cached(path: Path, facts: dict):
    """The choice a cache file holds ({"precision", "reason", "probe"}), or None when it is absent, or damaged or
    made for another machine (then with one warning); the choice is then decided again and rewritten."""
    if not os.path.lexists(path):
        return None
    try:
        data = read_json(path, "a precision cache")
    except InputError:  # truncated, corrupted, nested too deeply, not a regular file, ...
        data = None
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT and data.get("facts") == facts
            and data.get("precision") in ("fp32", "bf16") and isinstance(data.get("reason"), str)):
        print(f"warning: {path}: not a precision cache of this machine (damaged or edited); deciding again",
              file=sys.stderr)
        return None
    return {k: data.get(k) for k in ("precision", "reason", "probe")}


if __name__ == "__main__":  # `python -m dpo.engine.precision`: this CPU's kind and what --precision auto picks on it
    facts = cpu_facts()
    print(json.dumps({"kind": cpu_kind(facts), **facts, "auto": choose("auto", torch.device("cpu"))}, indent=1))
