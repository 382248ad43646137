"""LoRA (Hu et al. 2021), hand-rolled: `dpo train --lora-r R` trains low-rank adapters beside frozen base weights.

A targeted linear map y = base(x) (torch's nn.Linear, weight [out, in]; GPT-2's Conv1D, weight [in, out], y = x W + b)
becomes `LoraLayer`:

    y = base(x) + (alpha / r) * B A dropout(x)        A [r, in]: kaiming-uniform (nn.Linear's and peft's init)
                                                      B [out, r]: zeros

so before its first step the policy computes exactly what the base model does. Every base weight is frozen; only A
and B train. The reference model is the same model with its adapters switched off (`adapters_off`): no second
copy, and the reference pass costs no more memory than a forward pass.

Targets (`--lora-targets`) are module names matched as peft matches them: `c_proj` is every module named c_proj
(GPT-2's attention and MLP output), `attn.c_proj` only those inside an `attn`. Default: every linear map but the
output embedding (attention and MLP), as QLoRA found LoRA needs to match full fine-tuning.

Saved: `save_adapters` writes A and B alone (adapter_model.safetensors, peft's tensor names, fp32) and
adapter_config.json (peft's LoRA fields): what a LoRA run's checkpoints hold besides the trainer state, and
`load_adapters` reads them back (safetensors: nothing is unpickled). `merge` folds (alpha / r) B A into each base
weight and puts the base layers back: a plain model, as a LoRA run's `final/` holds it (with the adapters alone in
final/adapters/).
"""

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from dpo.core.files import InputError, atomic_write_json, follow_umask, read_json

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FILES = (WEIGHTS, CONFIG)


def conv1d_class():
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear map (imported when a model is adapted)

    return Conv1D


class LoraLayer(nn.Module):
    """A frozen linear map plus scale * B A: see the module docstring. `enabled` False: the base map alone."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.r, self.alpha, self.scale, self.enabled = base, r, alpha, alpha / r, True
        self.transposed = isinstance(base, conv1d_class())  # Conv1D: weight [in, out]
        n_in, n_out = base.weight.shape if self.transposed else base.weight.shape[::-1]
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, n_in, **like))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        low_rank = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return out + self.scale * low_rank

    def delta(self) -> torch.Tensor:
        """scale * B A in the layout of the base weight."""
        d = self.scale * (self.lora_B @ self.lora_A)
        return d.T if self.transposed else d


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_layers(model) -> dict:
    """name -> module of every linear map LoRA can adapt: nn.Linear and Conv1D, except the output embedding (tied
    to the input embedding in GPT-2 and SmolLM2)."""
    head, kinds = model.get_output_embeddings(), (nn.Linear, conv1d_class())
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and m is not head}


def add_adapters(model, r: int, alpha: float, targets: str, dropout: float, spec: str) -> None:
    """Freeze every weight of `model` and wrap each targeted linear map in a LoraLayer (in place). targets: comma-
    separated module names, "" for every linear map (the last name of each, in model order). A target that matches
    no linear map is an InputError naming those there are."""
    layers = linear_layers(model)
    names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))
    wanted = [t.strip() for t in targets.split(",") if t.strip()] or names
    for target in wanted:
        if not any(matches(n, target) for n in layers):
            raise InputError(f"--lora-targets {target!r} matches no linear layer of {spec} that LoRA can adapt "
                             f"({', '.join(names) or 'none'}; not the output embedding)")
    model.requires_grad_(False)
    for name, module in layers.items():
        if any(matches(name, t) for t in wanted):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoraLayer(module, r, alpha, dropout))
    model.lora_targets = wanted


def adapters(model) -> dict:
    """name -> LoraLayer of a model ({} for one without adapters)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def describe(model):
    """What config.json records of a LoRA policy (None without adapters)."""
    layers = adapters(model)
    if not layers:
        return None
    one = next(iter(layers.values()))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"r": one.r, "alpha": one.alpha, "scale": one.scale, "targets": model.lora_targets, "layers": len(layers),
            "dropout": one.dropout.p if isinstance(one.dropout, nn.Dropout) else 0.0,
            "trainable_params": trainable, "params": sum(p.numel() for p in model.parameters())}


@contextlib.contextmanager
def adapters_off(model):
    """The model as its base (the reference), for the duration of the block; a model without adapters as it is."""
    layers = adapters(model).values()
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


@torch.no_grad()
def merge(model):
    """Fold each adapter into its base weight (W + scale B A) and put the base layer back, in place: the plain
    model, which save_pretrained saves and from_pretrained loads as any other."""
    for name, layer in adapters(model).items():
        layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


# ------------------------------------------------------------------------------------------------ saved adapters

def tensor_names(model) -> dict:
    """peft's file names of the adapters' tensors -> the parameters."""
    return {f"base_model.model.{name}.lora_{k}.weight": getattr(layer, f"lora_{k}")
            for name, layer in adapters(model).items() for k in "AB"}


def save_adapters(model, folder: Path) -> None:
    """folder/adapter_model.safetensors (A and B in fp32) and folder/adapter_config.json (peft's LoRA fields, so
    peft's PeftModel can load them too)."""
    from safetensors.torch import save_file

    layers = list(adapters(model).values())
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensor_names(model).items()}, folder / WEIGHTS)
    follow_umask(folder)
    atomic_write_json(folder / CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": layers[0].r, "lora_alpha": layers[0].alpha,
        "target_modules": model.lora_targets, "lora_dropout": describe(model)["dropout"], "bias": "none",
        "fan_in_fan_out": layers[0].transposed, "base_model_name_or_path": getattr(model, "name_or_path", "")},
        indent=1)


def load_adapters(model, folder: Path) -> None:
    """The adapters saved in folder into the model's LoraLayers, once their config has the model's rank and alpha
    and the file holds exactly the model's tensors, in their shapes; anything else is one InputError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_json(folder / CONFIG, "a LoRA adapter config")
    layer = next(iter(adapters(model).values()))
    if not isinstance(config, dict) or (config.get("r"), config.get("lora_alpha")) != (layer.r, layer.alpha):
        raise InputError(f"{folder / CONFIG}: not adapters of rank {layer.r} and alpha {layer.alpha}, this run's")
    try:
        saved = load_file(folder / WEIGHTS, device=str(layer.lora_A.device))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{folder / WEIGHTS}: cannot read it ({e})") from None
    params = tensor_names(model)
    wrong = sorted(set(saved) ^ set(params)) or [k for k in params if saved[k].shape != params[k].shape]
    if wrong:
        raise InputError(f"{folder / WEIGHTS}: not this run's adapters (tensor {wrong[0]} missing, extra or of "
                         "another shape)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
