"""Peer side of the DPO speed benchmark: Hugging Face TRL's DPOTrainer on the same pairs as dpo-noise.

Run with the TRL venv's python, never a dependency of dpo-noise:
    PY=$(experiments/bench/peer_venv.sh trl "trl==1.16.0" "transformers==5.24.0")   # = PINS below
    $PY experiments/bench/trl_dpo.py --model DIR --pairs FILE.json --n-pairs 48 --micro-batch 4 --grad-accum 4 \
        --max-length 1024 --gradient-checkpointing --beta 0.1 --lr 5e-7 --out RESULT.json [--threads N]
Trains fp32 on CPU for exactly n_pairs / (micro_batch * grad_accum) optimizer steps (one shuffled epoch), no eval,
saving, logging or reporting. Reference model as a typical user gets it: ref_model=None, so TRL loads a second
frozen copy from the same folder and runs it on every micro-batch (precompute_ref_log_probs=False).
Writes to --out and prints, as JSON:
  train_s, pairs_per_s   wall time of trainer.train() only (no model loading, no DPOTrainer construction); n / train_s
  tokenize_s             TRL's dataset preparation (add EOS, tokenize, filter) inside the DPOTrainer constructor
  init_s                 the whole DPOTrainer constructor (tokenize_s + loading the reference copy)
  peak_rss_mib           ru_maxrss of the whole process, MiB, model loading included (*_before_train_mib: before)
  final_loss, mean_loss  DPO loss of the last optimizer step (mean of its micro-batches); mean over all steps
  versions, pins_match, and the settings used.
"""
import argparse
import json
import os
import resource
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's gradient->activation checkpointing renames
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")  # local folders only, never the hub

# Exact versions this script was written and checked against (peer_venv.sh installs torch==2.13.0 itself).
PINS = ("trl==1.16.0", "transformers==5.24.0")


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn, sink):
    def run(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        sink.append(time.perf_counter() - t)
        return out
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="plain HF model folder")
    p.add_argument("--pairs", required=True, help="JSON list of {prompt, chosen, rejected}")
    for flag, default in (("n-pairs", 48), ("micro-batch", 4), ("grad-accum", 4), ("max-length", 1024),
                          ("beta", 0.1), ("lr", 5e-7), ("threads", None)):
        p.add_argument(f"--{flag}", type=type(default) if default else int, default=default)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    per_step = args.micro_batch * args.grad_accum
    if args.n_pairs % per_step:
        p.error(f"--n-pairs {args.n_pairs} is not a multiple of micro-batch * grad-accum = {per_step}")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
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

    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the new name wins); TRL defaults the
    # old one to True, so the flag is always set explicitly: no --gradient-checkpointing means off.
    # Trainer wants an output_dir; nothing is saved there.
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=1, max_steps=args.n_pairs // per_step,
        learning_rate=args.lr, beta=args.beta, max_length=args.max_length,
        activation_checkpointing=args.gradient_checkpointing,
        bf16=False, fp16=False, use_cpu=True, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    assert config.gradient_checkpointing == args.gradient_checkpointing and config.precompute_ref_log_probs is False

    prep_s, losses = [], []  # TRL's tokenization time (inside the constructor); per micro-batch DPO losses
    prepare = DPOTrainer._prepare_dataset
    DPOTrainer._prepare_dataset = timed(prepare, prep_s)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=dataset, processing_class=tokenizer)
    init_s = time.perf_counter() - t0
    DPOTrainer._prepare_dataset = prepare
    compute_loss = trainer.compute_loss  # losses kept as tensors: recording them adds no synchronisation

    def recording_compute_loss(*a, **kw):
        loss = compute_loss(*a, **kw)
        losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
        return loss

    trainer.compute_loss = recording_compute_loss
    rss_before = rss_mib()
    t0 = time.perf_counter()
    train_out = trainer.train()
    train_s = time.perf_counter() - t0

    result = {
        "peer": "trl.DPOTrainer", "n_pairs": args.n_pairs, "pairs_after_tokenize": len(trainer.train_dataset),
        "optimizer_steps": trainer.state.global_step, "train_s": round(train_s, 3),
        "pairs_per_s": round(args.n_pairs / train_s, 4), "tokenize_s": round(sum(prep_s), 3),
        "init_s": round(init_s, 3), "peak_rss_mib": round(rss_mib(), 1),
        "peak_rss_before_train_mib": round(rss_before, 1),
        "final_loss": float(torch.stack(losses[-args.grad_accum:]).mean()), "mean_loss": train_out.training_loss,
        "micro_batches": len(losses), "gradient_checkpointing": trainer.model.is_activation_checkpointing,
        "ref_model": "None -> TRL loads a second frozen copy from --model", "precompute_ref_log_probs": False,
        "settings": {k: getattr(args, k) for k in ("model", "pairs", "micro_batch", "grad_accum", "max_length",
                                                   "beta", "lr", "threads")},
        "torch_threads": torch.get_num_threads(), "dtype": str(model.dtype), "optim": str(config.optim.value),
        "lr_scheduler": f"{config.lr_scheduler_type.value}, warmup {config.warmup_steps}",
        "versions": versions, "pins_match": all(versions[pin.split("==")[0]] == pin.split("==")[1] for pin in PINS),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
