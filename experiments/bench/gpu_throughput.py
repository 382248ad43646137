"""GPU training throughput of the dpo-noise loop on GPT-2 Large's architecture with random weights (no download).

    .venv/bin/python experiments/bench/gpu_throughput.py --micro-batches 4 16 --out experiments/bench/results/gpu.json

Runs the trainer's own pieces (logprobs.collate / pair_logprobs, losses.dpo_loss, bf16 autocast, gradient
checkpointing, fused AdamW) on synthetic mc-shaped pairs (prompt of --prompt-tokens, one-token responses) or
completion-shaped pairs (--response-tokens > 1). Reports pairs/s, tokens/s, model FLOPs utilisation (6 N tokens for
the policy plus 2 N tokens for a reference forward, N = non-embedding parameters, against --peak-tflops) and peak
memory, per micro-batch size. Needs CUDA; exits with a message otherwise.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dpo.files import atomic_write_json  # noqa: E402
from dpo.logprobs import Example, collate, pair_logprobs  # noqa: E402
from dpo.losses import dpo_loss  # noqa: E402


def measure(model, micro: int, args) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def example():
        prompt = torch.randint(vocab, (args.prompt_tokens,), generator=g).tolist()
        common = torch.randint(vocab, (args.response_tokens - 1,), generator=g).tolist()
        return Example(prompt, common + [1], common + [2], False, False)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        batches = [collate([example() for _ in range(micro)], 0) for _ in range(args.grad_accum)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pc, pr = pair_logprobs(model, batch)
            ref = torch.zeros_like(pc)  # cached reference log-probs (their values do not change the cost)
            loss = dpo_loss("sigmoid", pc, pr, ref, ref, 0.1).sum() / (micro * args.grad_accum)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += sum(b["tokens"] for b in batches)
    seconds = sum(times)
    pairs = micro * args.grad_accum * args.steps
    n_params = sum(p.numel() for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n)
    flops = (6 + 2) * n_params * tokens  # policy forward+backward, plus a reference forward per token
    return {"micro_batch": micro, "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / (args.peak_tflops * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "step_seconds": seconds / args.steps}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 16], help="micro-batch sizes to measure")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of the synthetic pairs")
    p.add_argument("--response-tokens", type=int, default=1, help="1: mc-shaped pairs (shared row)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--out", default=str(ROOT / "experiments/bench/results/gpu.json"), help="result JSON")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py needs a CUDA GPU")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.from_dict({"n_embd": 1280, "n_layer": 36, "n_head": 20, "vocab_size": 50257,
                                                  "n_positions": 1024})).cuda()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if not args.no_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    rows = [measure(model, micro, args) for micro in args.micro_batches]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": vars(args), "rows": rows}
    atomic_write_json(args.out, result, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
