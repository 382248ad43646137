"""Peer side of the DPO speed benchmarks: Hugging Face TRL's DPOTrainer on the same pairs as dpo-noise.

Run with a python that has TRL, never a dependency of dpo-noise (the TRL venv on the CPU; on a GPU machine,
whatever python has `pip install trl`, as gpu_suite.sh uses it):
    PY=$(experiments/bench/peer_venv.sh trl "trl==1.16.0" "transformers==5.24.0")   # = PINS below
    $PY experiments/bench/trl_dpo.py --model DIR --pairs FILE.json --n-pairs 48 --micro-batch 4 --grad-accum 4 \\
        --max-length 1024 --gradient-checkpointing --beta 0.1 --lr 5e-7 --out RESULT.json \\
        [--bf16] [--precompute-ref] [--device cuda] [--max-steps N --steady-from K] [--threads N]
Trains --max-steps optimizer steps (default: one shuffled epoch of --n-pairs) with no eval, saving, logging or
reporting. The model is loaded in fp32; --bf16 is TRL's `bf16=True` (autocast; fp32 weights). The reference is
what a typical user gets: ref_model=None, so TRL either loads a second frozen copy from the same folder and runs it
on every micro-batch (its default), or, with --precompute-ref (`precompute_ref_log_probs=True`), runs the model
once over the pairs inside the DPOTrainer constructor and keeps no reference copy.
Writes to --out and prints, as JSON:
  train_s, pairs_per_s   wall time of trainer.train() only (no model loading, no DPOTrainer construction); pairs / s
  steady_pairs_per_s     pairs of steps --steady-from (default 2; 1 for a single step)..last / their seconds
                         (step ends taken after a device sync)
  step_seconds           every optimizer step's seconds, end to end (data loading included)
  tokenize_s             TRL's dataset preparation (add EOS, tokenize, filter) inside the DPOTrainer constructor
  precompute_s           TRL's reference pass with --precompute-ref (inside the constructor), else 0
  init_s                 the whole DPOTrainer constructor (tokenize_s + precompute_s + loading the reference copy)
  peak_rss_mib           ru_maxrss of the whole process, MiB, model loading included (*_before_train_mib: before)
  peak_cuda_mib          torch.cuda.max_memory_allocated on CUDA, else null
  final_loss, mean_loss  DPO loss of the last optimizer step (mean of its micro-batches); mean over all steps
  versions, pins_match, and the settings used.
"""
import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
import warnings

from benchlib import json_text, timed  # this folder (the script's) is on sys.path

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's gradient->activation checkpointing renames
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")  # local folders only, never the hub

# Exact versions this script was written and checked against on the CPU (peer_venv.sh installs torch==2.13.0 itself);
# the GPU suite runs it with the device's transformers (5.17.0) instead.
PINS = ("trl==1.16.0", "transformers==5.24.0")


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="plain HF model folder")
    p.add_argument("--pairs", required=True, help="JSON list of {prompt, chosen, rejected}")
    for flag, default in (("n-pairs", 48), ("micro-batch", 4), ("grad-accum", 4), ("max-length", 1024),
                          ("beta", 0.1), ("lr", 5e-7), ("threads", None), ("max-steps", None), ("steady-from", None)):
        p.add_argument(f"--{flag}", type=type(default) if default else int, default=default)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="TRL's bf16=True: autocast, fp32 weights")
    p.add_argument("--precompute-ref", action="store_true", help="precompute_ref_log_probs=True")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    per_step = args.micro_batch * args.grad_accum
    if not args.max_steps and args.n_pairs % per_step:
        p.error(f"--n-pairs {args.n_pairs} is not a multiple of micro-batch * grad-accum = {per_step}")
    steps = args.max_steps or args.n_pairs // per_step
    args.steady_from = args.steady_from or min(2, steps)  # default: all steps but the first, if there are several
    if not 1 <= args.steady_from <= steps:
        p.error(f"--steady-from {args.steady_from} must be within 1..{steps} (the optimizer steps)")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    versions = {m.__name__: m.__version__ for m in (trl, transformers, torch, datasets)}
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.pairs) as f:
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in json.load(f)[: args.n_pairs]]
    if len(rows) < args.n_pairs:
        p.error(f"{args.pairs} has only {len(rows)} pairs")
    dataset = datasets.Dataset.from_list(rows)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    # TRL defaults gradient checkpointing to on, so it is always set explicitly (no flag: off). transformers >= 5.2x
    # renamed it activation_checkpointing (the new name wins); older 5.x (5.17, say) has only the old.
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = {k: args.gradient_checkpointing for k in ("gradient_checkpointing", "activation_checkpointing")
                     if k in names}
    # Trainer wants an output_dir; nothing is saved there.
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=1, max_steps=steps,
        learning_rate=args.lr, beta=args.beta, max_length=args.max_length, **checkpointing,
        bf16=args.bf16, fp16=False, use_cpu=args.device == "cpu", precompute_ref_log_probs=args.precompute_ref,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    assert config.gradient_checkpointing == args.gradient_checkpointing

    prep_s, pre_s, losses = [], [], []  # TRL's tokenization and reference-pass times; per micro-batch DPO losses
    originals = DPOTrainer._prepare_dataset, DPOTrainer._precompute_ref_logps
    DPOTrainer._prepare_dataset = timed(originals[0], prep_s)
    DPOTrainer._precompute_ref_logps = timed(originals[1], pre_s)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer)
    init_s = time.perf_counter() - t0
    DPOTrainer._prepare_dataset, DPOTrainer._precompute_ref_logps = originals
    compute_loss = trainer.compute_loss  # losses kept as tensors: recording them adds no synchronisation

    def recording_compute_loss(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
        return loss

    cuda = args.device == "cuda"

    class StepTimer(TrainerCallback):
        """perf_counter at the start of training and at the end of every optimizer step, after a device sync."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    trainer.compute_loss = recording_compute_loss
    timer = StepTimer()
    trainer.add_callback(timer)
    rss_before = rss_mib()
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    steady = step_s[args.steady_from - 1:]
    pairs = trainer.state.global_step * per_step

    result = {
        "peer": "trl.DPOTrainer", "n_pairs": args.n_pairs, "pairs_after_tokenize": len(trainer.train_dataset),
        "optimizer_steps": trainer.state.global_step, "pairs_trained": pairs, "train_s": round(train_s, 3),
        "pairs_per_s": round(pairs / train_s, 4), "steady_steps": [args.steady_from, len(step_s)],
        "steady_pairs_per_s": round(len(steady) * per_step / sum(steady), 4) if steady else None,
        "step_seconds": [round(s, 4) for s in step_s], "tokenize_s": round(sum(prep_s), 3),
        "precompute_s": round(sum(pre_s), 3), "init_s": round(init_s, 3), "peak_rss_mib": round(rss_mib(), 1),
        "peak_rss_before_train_mib": round(rss_before, 1),
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "final_loss": float(torch.stack(losses[-args.grad_accum:]).mean()), "mean_loss": train_out.training_loss,
        "micro_batches": len(losses), "gradient_checkpointing": trainer.model.is_gradient_checkpointing,
        "bf16_autocast": config.bf16, "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "ref_model": "None: " + ("reference log-probs precomputed by TRL, no copy kept" if args.precompute_ref
                                 else "TRL loads a second frozen copy from --model, run every micro-batch"),
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "settings": {k: getattr(args, k) for k in ("model", "pairs", "micro_batch", "grad_accum", "max_length",
                                                   "beta", "lr", "threads", "max_steps", "steady_from")},
        "torch_threads": torch.get_num_threads(), "dtype": str(model.dtype), "optim": str(config.optim.value),
        "lr_scheduler": f"{config.lr_scheduler_type.value}, warmup {config.warmup_steps}",
        "versions": versions, "pins_match": all(versions[pin.split("==")[0]] == pin.split("==")[1] for pin in PINS),
    }
    with open(args.out, "w") as f:
        f.write(json_text(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=2))


if __name__ == "__main__":
    main()
