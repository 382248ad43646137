"""`dpo train`: DPO against a frozen reference model, as one plain loop.

Read it top to bottom: setup (data, models, reference log-probs) -> the loop (micro-batches, exact gradient
accumulation, clip, step, log, evaluate, checkpoint) -> final save. Nothing happens in callbacks.
"""

import hashlib
import json
import math
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpo import losses, models
from dpo.config import DataConfig, TrainConfig
from dpo.data import ensure_pairs
from dpo.files import InputError, TrainingDiverged, atomic_write_json, sha256_file
from dpo.logprobs import collate, pair_logprobs, tokenize_pairs
from dpo.pairs import read_pairs

# ----------------------------------------------------------------------------------------------- setup helpers

def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def plan_steps(examples, batch_size: int, micro: int, total_steps: int, seed: int) -> list:
    """Optimizer steps as lists of micro-batches of example indices. Each epoch is a seeded shuffle; within a
    step the pairs are sorted by length so micro-batches carry little padding (the step's update does not
    depend on how it is split). Deterministic: a resumed run recomputes the same plan."""
    steps, epoch = [], 0
    while len(steps) < total_steps:
        order = list(range(len(examples)))
        random.Random(f"{seed}/epoch{epoch}").shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = sorted(order[start:start + batch_size], key=lambda i: examples[i].length)
            steps.append([idx[j:j + micro] for j in range(0, len(idx), micro)])
        epoch += 1
    return steps[:total_steps]


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


def logprobs_in_batches(model, examples, batch_size: int, pad_id: int, device, desc: str):
    """Chosen and rejected log-probs of every example under `model`, without gradients (sorted by length)."""
    chosen, rejected = torch.zeros(len(examples)), torch.zeros(len(examples))
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    was_training = model.training
    model.eval()
    with torch.inference_mode(), models.autocast(device):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) < 64):
            idx = order[start:start + batch_size]
            c, r = pair_logprobs(model, collate([examples[i] for i in idx], pad_id))
            chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return chosen, rejected


def reference_cache_path(cfg: TrainConfig, tokenizer, device) -> Path:
    """One cache file per (reference weights, tokenizer, max length, device type)."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    key = json.dumps([models.model_id(cfg.model), vocab, cfg.max_length, device.type])
    return Path(cfg.cache_dir) / "ref" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")


def pair_key(pair) -> str:
    """Cache key of a pair that ignores which response is labelled chosen: a flipped pair hits the same entry."""
    low, high = sorted((pair["chosen"], pair["rejected"]))
    return hashlib.sha256(json.dumps([pair["prompt"], low, high]).encode()).hexdigest()


def cached_reference_logprobs(model, pairs, examples, cache_path: Path, batch_size, pad_id, device, desc):
    """Reference log-probs from the disk cache, computing (and adding) only the missing pairs. A noise sweep
    over one dataset computes them once: flipping swaps chosen and rejected but not the key."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    keys = [pair_key(p) for p in pairs]
    missing = [i for i, k in enumerate(keys) if k not in cache]
    if missing:
        c, r = logprobs_in_batches(model, [examples[i] for i in missing], batch_size, pad_id, device, desc)
        for j, i in enumerate(missing):
            low_first = pairs[i]["chosen"] <= pairs[i]["rejected"]
            cache[keys[i]] = [c[j].item(), r[j].item()] if low_first else [r[j].item(), c[j].item()]
        atomic_write_json(cache_path, cache)
    chosen, rejected = [], []
    for p, k in zip(pairs, keys):
        low, high = cache[k]
        chosen.append(low if p["chosen"] <= p["rejected"] else high)
        rejected.append(high if p["chosen"] <= p["rejected"] else low)
    return torch.tensor(chosen), torch.tensor(rejected), len(missing)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoints(out_dir: Path) -> list:
    return sorted((out_dir / "checkpoints").glob("step_*[0-9]"))


def save_checkpoint(out_dir: Path, step: int, policy, tokenizer, optimizer, scheduler, keep: int) -> Path:
    """policy (save_pretrained) + tokenizer + trainer state, written to a temporary folder renamed when
    complete; only the newest `keep` are kept."""
    final = out_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def restore_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ----------------------------------------------------------------------------------------------------- metrics

def pair_stats(loss, pc, pr, rc, rr, beta, flipped) -> dict:
    """Sums over the pairs of a micro-batch (divided by counts when a step is logged)."""
    chosen_r, rejected_r = losses.rewards(pc, rc, beta), losses.rewards(pr, rr, beta)
    prefers_label = (chosen_r > rejected_r).float()
    flipped = flipped.float()
    return {"loss": loss.detach().sum().item(), "rewards/chosen": chosen_r.sum().item(),
            "rewards/rejected": rejected_r.sum().item(), "rewards/accuracy": prefers_label.sum().item(),
            "rewards/margin": (chosen_r - rejected_r).sum().item(), "logps/chosen": pc.detach().sum().item(),
            "logps/rejected": pr.detach().sum().item(),
            # accuracy against the *true* label: on clean pairs the label, on flipped pairs its opposite
            "true_accuracy/clean": (prefers_label * (1 - flipped)).sum().item(),
            "true_accuracy/flipped": ((1 - prefers_label) * flipped).sum().item(),
            "pairs": len(flipped), "pairs/flipped": flipped.sum().item()}


def summarize(sums: dict) -> dict:
    n, n_flipped = sums["pairs"], sums["pairs/flipped"]
    out = {k: v / n for k, v in sums.items() if not k.startswith(("pairs", "true_accuracy"))}
    out["true_accuracy/clean"] = sums["true_accuracy/clean"] / max(1, n - n_flipped) if n > n_flipped else None
    out["true_accuracy/flipped"] = sums["true_accuracy/flipped"] / n_flipped if n_flipped else None
    return {k: v for k, v in out.items() if v is not None}


def add_sums(total: dict, part: dict) -> dict:
    return {k: total.get(k, 0) + v for k, v in part.items()}


def evaluate(policy, val_examples, val_ref, cfg, pad_id, device) -> dict:
    pc, pr = logprobs_in_batches(policy, val_examples, 2 * cfg.per_device_train_batch_size, pad_id, device, "eval")
    rc, rr = val_ref
    loss = losses.dpo_loss(cfg.loss, pc, pr, rc, rr, cfg.beta, cfg.eps)
    return summarize(pair_stats(loss, pc, pr, rc, rr, cfg.beta, torch.zeros(len(pc))))


# ------------------------------------------------------------------------------------------------------- train

def resolve_files(data_cfg: DataConfig, cfg: TrainConfig):
    if cfg.train_data_path:
        return Path(cfg.train_data_path), Path(cfg.val_data_path) if cfg.val_data_path else None
    train_path, val_path = ensure_pairs(data_cfg)
    return train_path, Path(cfg.val_data_path) if cfg.val_data_path else val_path


def train(data_cfg: DataConfig, cfg: TrainConfig) -> dict:
    # ---- setup
    if cfg.loss == "rdpo" and not 0 <= cfg.eps < 0.5:
        raise InputError(f"--loss rdpo needs 0 <= --eps < 0.5, got {cfg.eps}")
    if cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise InputError("batch size and gradient accumulation steps must be >= 1")
    device = models.pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_path, val_path = resolve_files(data_cfg, cfg)
    train_pairs = read_pairs(train_path)
    val_pairs = read_pairs(val_path) if val_path else []
    if cfg.val_size:
        val_pairs = val_pairs[: cfg.val_size]
    run_name = cfg.run_name or f"{models.slug(cfg.model)}-{train_path.stem}-{cfg.loss}"
    out_dir = Path(cfg.output_dir or Path("runs") / run_name)
    if not cfg.resume and checkpoints(out_dir):
        raise InputError(f"{out_dir} already has checkpoints: pass --resume to continue, or another --run-name")
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(data_cfg.seed)
    random.seed(data_cfg.seed)
    np.random.seed(data_cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.load_model(cfg.model, dtype=torch.float32, device=device)
    disable_dropout(policy)
    examples = tokenize_pairs(tokenizer, train_pairs, cfg.max_length)
    val_examples = tokenize_pairs(tokenizer, val_pairs, cfg.max_length)
    pad_id = tokenizer.pad_token_id

    # ---- reference log-probs: the policy *is* the reference before its first step, so it computes them
    ref_batch = 2 * cfg.per_device_train_batch_size
    t_ref = time.perf_counter()
    reference = None
    cache_path = reference_cache_path(cfg, tokenizer, device)
    if cfg.ref_on_the_fly:
        reference = models.load_model(cfg.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                      device=device)
        reference.eval().requires_grad_(False)
        train_ref, computed = None, 0
    else:
        *train_ref, computed = cached_reference_logprobs(policy, train_pairs, examples, cache_path, ref_batch,
                                                         pad_id, device, "reference log-probs")
    val_ref = None
    if val_examples:
        *val_ref, _ = cached_reference_logprobs(reference or policy, val_pairs, val_examples, cache_path,
                                                ref_batch, pad_id, device, "reference log-probs (val)")

    reference_seconds = time.perf_counter() - t_ref
    batch_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(examples) / batch_size)
    plan = plan_steps(examples, batch_size, cfg.per_device_train_batch_size, total_steps, data_cfg.seed)
    checkpointing = device.type == "cuda" if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    if checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None)  # transformers >= 5.x names it so
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type))

    start_step = 0
    if cfg.resume and checkpoints(out_dir):
        last = checkpoints(out_dir)[-1]
        policy.load_state_dict(models.load_model(str(last), dtype=torch.float32, device=device).state_dict())
        state = torch.load(last / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        start_step = state["step"]
        print(f"resumed from {last} (step {start_step} of {total_steps})")

    truncated = sum(ex.truncated for ex in examples)
    run_config = {
        "run": run_name, "output_dir": str(out_dir), "data": asdict(data_cfg), "train": asdict(cfg),
        "files": {"train": str(train_path), "train_sha256": sha256_file(train_path),
                  "val": str(val_path) if val_path else None,
                  "val_sha256": sha256_file(val_path) if val_path else None},
        "resolved_model": models.resolve(cfg.model), "pairs": len(examples), "val_pairs": len(val_examples),
        "flipped": sum(ex.flipped for ex in examples), "truncated_pairs": truncated,
        "gradient_checkpointing": checkpointing, "total_steps": total_steps, "batch_size": batch_size,
        "reference_cache": str(cache_path),
        "reference_pairs_computed": computed, "reference_seconds": reference_seconds,
        "git_commit": git_commit(), "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    atomic_write_json(out_dir / "config.json", run_config, indent=1)
    if truncated:
        print(f"note: {truncated} of {len(examples)} pairs were cut to --max-length {cfg.max_length}")

    # ---- the loop
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir), purge_step=start_step + 1 if start_step else None)
    metrics_path = out_dir / "metrics.jsonl"
    kept = [ln for ln in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
            if json.loads(ln)["step"] <= start_step]
    metrics_file = open(metrics_path, "w")
    metrics_file.writelines(ln + "\n" for ln in kept)

    def log(step, values, prefix):
        for k, v in values.items():
            writer.add_scalar(f"{prefix}/{k}", v, step)
        metrics_file.write(json.dumps({"step": step, "split": prefix, **values}) + "\n")
        metrics_file.flush()

    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    last_val, last_ckpt = {}, (checkpoints(out_dir) or [None])[-1]
    train_seconds, trained_pairs = 0.0, 0
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=run_name)
    try:
        for step in bar:
            t0 = time.perf_counter()
            micro_batches = plan[step]
            n_step = sum(len(mb) for mb in micro_batches)
            sums, tokens = {}, 0
            for mb in micro_batches:
                batch = collate([examples[i] for i in mb], pad_id)
                with models.autocast(device):
                    pc, pr = pair_logprobs(policy, batch)
                    if reference is not None:
                        with torch.no_grad():
                            rc, rr = pair_logprobs(reference, batch)
                    else:
                        rc, rr = train_ref[0][mb].to(device), train_ref[1][mb].to(device)
                loss = losses.dpo_loss(cfg.loss, pc, pr, rc, rr, cfg.beta, cfg.eps)
                (loss.sum() / n_step).backward()  # exact accumulation: the step's mean over all its pairs
                flipped = torch.tensor([examples[i].flipped for i in mb], device=device)
                sums = add_sums(sums, pair_stats(loss, pc, pr, rc, rr, cfg.beta, flipped))
                tokens += batch["tokens"]
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                raise TrainingDiverged(f"non-finite loss or gradient at step {step + 1} (loss {sums['loss']}, "
                                       f"grad norm {grad_norm}); last good checkpoint: {last_ckpt or 'none'}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - t0
            train_seconds, trained_pairs = train_seconds + seconds, trained_pairs + n_step
            values = summarize(sums)
            values.update({"lr": lr, "grad_norm": grad_norm, "pairs_per_s": n_step / seconds,
                           "tokens_per_s": tokens / seconds, "peak_memory_mb": peak_memory_mb(device)})
            log(step + 1, values, "train")
            done = step + 1 == total_steps
            if val_examples and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                last_val = evaluate(policy, val_examples, val_ref, cfg, pad_id, device)
                log(step + 1, last_val, "val")
            bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracy']:.2f}",
                            val_acc=f"{last_val.get('rewards/accuracy', float('nan')):.2f}",
                            pairs_s=f"{values['pairs_per_s']:.2f}")
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done or stop["requested"]:
                last_ckpt = save_checkpoint(out_dir, step + 1, policy, tokenizer, optimizer, scheduler,
                                            cfg.keep_checkpoints)
            if stop["requested"]:
                print(f"stopped at step {step + 1}; continue with --resume (checkpoint {last_ckpt})")
                return {"out_dir": str(out_dir), "step": step + 1, "stopped": True}
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        writer.close()
        metrics_file.close()

    # ---- final save: the policy as a plain HF folder, loadable with AutoModelForCausalLM
    final = out_dir / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(last_ckpt, final, ignore=shutil.ignore_patterns("trainer_state.pt"))
    summary = {"run": run_name, "out_dir": str(out_dir), "steps": total_steps, "final": str(final),
               "val": last_val, "train_seconds": train_seconds, "pairs_trained": trained_pairs,
               "reference_seconds": reference_seconds,
               "peak_memory_mb": peak_memory_mb(device)}
    atomic_write_json(out_dir / "summary.json", summary, indent=1)
    print(f"done: {out_dir} (policy in {final}; curves: make tensorboard)")
    if last_val:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
    return summary
