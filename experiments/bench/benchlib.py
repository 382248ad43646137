"""Shared by the benchmark scripts: the steady state of a `dpo train` run from its metrics.jsonl, non-embedding
parameters, model FLOPs utilisation. Plain Python; `non_embedding_params` imports torch and transformers."""

import json
import math
import os
import re
import time
from pathlib import Path

H100_BF16_DENSE = 989e12  # FLOP/s: H100 SXM, dense bf16 (the datasheet's 1979 counts 2:4 sparsity)


def json_text(obj, indent=1) -> str:
    """Strict JSON of a result, as dpo.core.files.json_text writes (this module runs without dpo installed): every
    non-finite number (NaN, Infinity) becomes null, which strict parsers read; Python's json would write NaN."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_lines(run_dir) -> list:
    """The training lines of run_dir/metrics.jsonl, by step."""
    return sorted((r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r.get("split") == "train"),
                  key=lambda r: r["step"])


def step_seconds(line: dict, step_pairs: int) -> float:
    """A step's seconds: its own `seconds`, else its pairs / pairs_per_s."""
    return line["seconds"] if "seconds" in line else step_pairs / line["pairs_per_s"]


def steady_state(run_dir, first: int, last: int = 0) -> dict:
    """Rates over training steps first..last (1-based, inclusive; last 0: the last logged step) of a `dpo train`
    run: pairs/s = the pairs of those steps / their summed seconds, tokens/s (real policy tokens) likewise."""
    run_dir = Path(run_dir)
    step_pairs = read_json(run_dir / "config.json")["batch_size"]
    lines = train_lines(run_dir)
    last = last or (lines[-1]["step"] if lines else 0)
    window = [r for r in lines if first <= r["step"] <= last]
    if len(window) != last - first + 1:
        raise ValueError(f"{run_dir}/metrics.jsonl: training steps {first}..{last} expected, "
                         f"found {[r['step'] for r in window]}")
    seconds = [step_seconds(r, step_pairs) for r in window]
    pairs = sum(r["pairs_per_s"] * s for r, s in zip(window, seconds))
    tokens = sum(r["tokens_per_s"] * s for r, s in zip(window, seconds))
    total = sum(seconds)
    return {"steps": [first, last], "seconds": total, "pairs": round(pairs), "tokens": round(tokens),
            "pairs_per_s": pairs / total, "tokens_per_s": tokens / total,
            "peak_memory_mb": max(r.get("peak_memory_mb", 0.0) for r in window),
            "step_seconds": [step_seconds(r, step_pairs) for r in lines]}


def non_embedding_params(model_dir) -> int:
    """Parameters of the model in model_dir less its token and position embeddings (an output projection tied to
    the token embedding is the same tensor and is not counted either). Built on the meta device: no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    skip = {id(model.get_input_embeddings().weight)}
    skip |= {id(p) for n, p in model.named_parameters() if n.endswith(("wpe.weight", "position_embeddings.weight"))}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def mfu(tokens_per_s: float, n_params: int, peak_flops: float = H100_BF16_DENSE) -> float:
    """Model FLOPs utilisation of training: 6 N FLOPs per policy token (forward + backward), over the peak. No
    credit for activation recompute or a reference forward."""
    return 6 * n_params * tokens_per_s / peak_flops


def timed(fn, sink):
    """fn, adding the seconds of each call to sink (peers' scripts time their phases with it; stdlib only)."""
    def run(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        sink.append(time.perf_counter() - t)
        return out
    return run


ROOT = Path(__file__).resolve().parents[2]
HELLASWAG = os.environ.get("DPO_HELLASWAG_DIR", "")  # a local HellaSwag copy: hellaswag_val.jsonl, seed/


def hellaswag_arg(parser, flag: str, *parts, help: str) -> None:
    """A flag for a file or folder of the local HellaSwag copy: by default DPO_HELLASWAG_DIR/<parts>, required
    (with that said) when the variable is unset."""
    default = str(Path(HELLASWAG, *parts)) if HELLASWAG else None
    parser.add_argument(flag, default=default, required=default is None,
                        help=f"{help} (default: $DPO_HELLASWAG_DIR{''.join('/' + p for p in parts)}; "
                             "DPO_HELLASWAG_DIR is unset here)" if default is None else f"{help} (default: {default})")


def portable(obj):
    """obj with every path in its strings written without this machine's folders: the checkout relative, the home
    folder as ~, temporary folders as TMP/ (results are committed)."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    text = obj.replace(str(ROOT) + "/", "").replace(str(Path.home()) + "/", "~/")
    return re.sub(r"(?<![\w.~])/tmp/(tmp\w+/)?", "TMP/", text)
