"""Which number format a run computes in: `--precision fp32 | bf16 | auto`, decided in one place.

fp32 everywhere on the CPU; bf16 on CUDA (forward and backward in a bf16 copy of the weights, fp32 master weights,
see dpo/train.py). The reference log-probs (`dpo/refcache.py`) are cached per precision, and `dpo audit` scores a
file in the precision `dpo train` would use on that device, so a later training run finds its reference log-probs
in the cache.
"""

import torch

TIE = {"fp32": 1e-4, "bf16": 2e-2}  # |h| (nats) at or below which chosen and rejected count as a tie


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for a --precision value on a device (auto: bf16 on CUDA, fp32 on the CPU)."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" else "fp32"
