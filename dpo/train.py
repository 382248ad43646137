"""`dpo train`: DPO against a frozen reference model, as one plain loop.

Read it top to bottom:

    setup(data_cfg, cfg) -> Run    data, the step plan, models, reference log-probs, optimizer, resume
    train_step(run, step) -> dict  one optimizer step: micro-batches, exact gradient accumulation, clip, update
    train(data_cfg, cfg)           setup, the loop (step, log, evaluate, checkpoint), the final save

Nothing happens in callbacks; benchmarks and tests call these same functions.

Several processes (`torchrun --nproc_per_node K -m dpo train ...`): each rank takes every K-th pair of each step
(`Dist.share`), accumulates its micro-batches without synchronizing (DistributedDataParallel's `no_sync`), and the
gradients are all-reduced once, in the step's last backward. The loss is scaled so that the update equals the
single-process one. The reference pass is sharded (each rank fills its share of the cache, then all read it); rank 0
alone writes logs, metrics and checkpoints. gloo on the CPU, nccl on GPUs.

Precision (`--precision`): fp32, or bf16, where forward and backward run in a bf16 copy of the weights (`run.model`)
while the fp32 master weights (`run.policy`), their gradients (accumulated in fp32 after every micro-batch) and the
AdamW state stay fp32; after each update the master weights are copied into the bf16 copy. That is the usual
mixed-precision scheme with one weight cast per step, instead of autocast re-casting every weight in every forward
(and recompute). What the studies compare is fp32 in both: the reference log-probs (the fp32 policy before its first
step scores them, so both precisions share cache entries) and the validation pass (the fp32 master weights). Auto:
bf16 on CUDA, and on a CPU whose bf16 matrix products are faster than fp32 (dpo/precision.py), else fp32.
`--compile` compiles each transformer block with torch.compile (dynamic shapes: one compilation serves every block
and every length).
"""

import math
import platform
import random
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpo import checkpoint, losses, models, refcache, runsettings
from dpo.checkpoint import AlreadyFinished, check_resume, checkpoints, resume, save_checkpoint, write_final
from dpo.config import DataConfig, TrainConfig
from dpo.data import ensure_pairs
from dpo.distributed import Dist, accumulating, agreed, init_distributed, pair_scorer
from dpo.files import (
    InputError,
    RunInUse,
    TrainingDiverged,
    atomic_write_json,
    check_writable,
    make_dirs,
    sha256_file,
)
from dpo.label_fix import audit_scalars, correct_labels
from dpo.logprobs import Logps, Tokenized, collate, logprobs_in_batches, pair_logprobs, tokenize_pairs
from dpo.pairs import read_pairs
from dpo.plan import Batching, Plan, lr_factor, plan_steps, resolve_batching
from dpo.precision import REFERENCE, TIE, Weights, choose, recorded, resolve_precision
from dpo.reference import Scorer, reference_pass, token_budget
from dpo.runfolder import Logger, check_output_dir, git_commit, leave_nothing, lock_run_dir, peak_memory_mb
from dpo.sources import ChatTemplate
from dpo.stepstats import STATS, pair_stats, summarize

# ------------------------------------------------------------------------------------------------------ setup

@dataclass
class Run:
    """Everything one training run holds: built by `setup`, advanced by `train_step`, closed by `train`."""
    cfg: TrainConfig
    data_cfg: DataConfig
    ranks: Dist
    device: torch.device
    out_dir: Path
    run_name: str
    precision: str  # "fp32" or "bf16"
    batching: Batching
    tokenizer: object
    weights: Weights  # the fp32 master weights (.policy) and what forward and backward run in (.model: the
    # policy, or its bf16 copy; maybe compiled)
    scorer: torch.nn.Module  # PairScorer(model), wrapped in DistributedDataParallel with several processes
    optimizer: torch.optim.Optimizer
    scheduler: object
    examples: list
    val_examples: list
    lengths: list
    flipped: torch.Tensor  # [N] on the device
    eps: float  # the loss's eps: --eps, or the audit's estimate (--eps auto|posterior)
    pair_eps: torch.Tensor  # [N] per-pair flip posteriors on the device (--eps posterior), else None
    ref: Logps  # [N] each, on the device, or None with a reference model
    val_ref: Logps
    reference: object  # the frozen reference model with --ref-on-the-fly, else None
    plan: Plan
    total_steps: int
    start_step: int
    info: dict = field(default_factory=dict)  # what config.json records about the setup
    lock: object = None  # the open lock file of the run folder


def resolve_files(data_cfg: DataConfig, cfg: TrainConfig):
    if cfg.train_data_path:
        return Path(cfg.train_data_path), Path(cfg.val_data_path) if cfg.val_data_path else None
    train_path, val_path = ensure_pairs(data_cfg, model=cfg.model)
    return train_path, Path(cfg.val_data_path) if cfg.val_data_path else val_path


def setup(data_cfg: DataConfig, cfg: TrainConfig) -> Run:
    """Check the settings, read the pairs, lock the run folder, load the models, compute (or read) the reference
    log-probs of the pairs the run will use, build the optimizer, and resume from the newest checkpoint."""
    data_cfg, cfg = data_cfg.validate(), cfg.validate()
    ranks = init_distributed(cfg.device)
    device = ranks.device
    models.set_threads(cfg.threads)
    tokenizer = models.load_tokenizer(cfg.model)  # a model that cannot load fails before any data is made
    train_path, val_path = resolve_files(data_cfg, cfg)
    chat = ChatTemplate(cfg.model)  # renders conversational rows, loaded only for them
    train_pairs = read_pairs(train_path, chat)
    val_pairs = read_pairs(val_path, chat) if val_path else []
    if cfg.val_size:
        val_pairs = val_pairs[: cfg.val_size]
    run_name = cfg.run_name or f"{models.slug(cfg.model)}-{train_path.stem}-{cfg.loss}"
    out_dir = Path(cfg.output_dir or Path("runs") / run_name)
    check_output_dir(out_dir)
    if not cfg.resume and checkpoints(out_dir):
        raise InputError(f"{out_dir} already has checkpoints: pass --resume to continue, or another --run-name")
    check_writable(out_dir, "the run folder")
    check_writable(cfg.cache_dir, "the reference cache folder")
    created, lock_made, lock = not out_dir.exists(), not (out_dir / ".lock").exists(), None
    try:
        if ranks.main:
            make_dirs(out_dir)
            lock = lock_run_dir(out_dir)
        settings = run_settings(cfg, data_cfg, tokenizer, device, train_path, val_path, ranks.world)
        if cfg.resume:
            check_resume(out_dir, settings, ranks.main)
        run = _build(data_cfg, cfg, ranks, device, out_dir, run_name, train_path, val_path, train_pairs, val_pairs,
                     tokenizer)
    except BaseException as e:
        if ranks.main:  # a run that never started leaves nothing behind (a busy folder is another run's)
            leave_nothing(out_dir, created and not isinstance(e, RunInUse), lock_made and not isinstance(e, RunInUse))
        if lock:
            lock.close()
        raise
    run.info["settings"] = settings
    run.lock = lock
    return run


def run_settings(cfg: TrainConfig, data_cfg: DataConfig, tokenizer, device, train_path, val_path,
                 processes: int) -> dict:
    """What each checkpoint records of the run's settings (dpo/runsettings.py): those that define its numbers,
    and the others."""
    key = refcache.cache_key(models.model_id(cfg.model), tokenizer, cfg.max_length,
                             resolve_precision(cfg.precision, device), device.type)
    return {"defining": runsettings.defining(cfg, data_cfg.seed, key["model"], key["tokenizer"],
                                             sha256_file(train_path), sha256_file(val_path) if val_path else None,
                                             key["precision"]),
            "other": runsettings.other(cfg, processes)}


def _build(data_cfg, cfg, ranks, device, out_dir, run_name, train_path, val_path, train_pairs, val_pairs,
           tokenizer) -> Run:
    torch.manual_seed(data_cfg.seed)
    random.seed(data_cfg.seed)
    np.random.seed(data_cfg.seed)
    policy = models.load_model(cfg.model, dtype=torch.float32, device=device)
    models.disable_dropout(policy)
    choice = choose(cfg.precision, device)
    precision = choice["precision"]
    weights = Weights(policy, precision == "bf16")
    model = weights.model
    # the fp32 policy *is* the reference before its first step: it scores what the cache lacks (in fp32 whatever
    # the training precision, so fp32 and bf16 runs share entries), unless a reference copy is kept
    ref_scorer = Scorer.of(policy, tokenizer, cfg.model, cfg.max_length, REFERENCE, cfg.cache_dir)
    train_pairs, pair_eps, eps, fixed = correct_labels(cfg, ref_scorer, train_pairs, train_path, val_path, ranks)
    examples = tokenize_apart(tokenizer, train_pairs, cfg.max_length, train_path)
    val_examples = tokenize_apart(tokenizer, val_pairs, cfg.max_length, val_path)
    lengths = [ex.length for ex in examples]
    batching = resolve_batching(cfg, device)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(examples) / batching.step_pairs)
    plan = plan_steps(lengths, batching.step_pairs, total_steps, data_cfg.seed)
    last = checkpoints(out_dir)[-1] if cfg.resume and checkpoints(out_dir) else None
    start_step = checkpoint.checkpoint_info(last)["step"] if last else 0

    if cfg.gradient_checkpointing:
        models.enable_checkpointing(model)
    compiled = device.type == "cuda" if cfg.compile is None else cfg.compile
    if compiled:
        models.compile_blocks(model)
    reference = models.frozen_reference(cfg.model, device) if cfg.ref_on_the_fly else None
    needed = None if cfg.ref_on_the_fly else plan.used(start_step)
    ref, val_ref, computed, reference_seconds = reference_pass(
        replace(ref_scorer, model=reference or policy), ranks, Tokenized(train_pairs, examples), needed,
        Tokenized(val_pairs, val_examples))

    model.train()
    scorer = pair_scorer(model, ranks)
    optimizer = torch.optim.AdamW(weights.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type))
    run = Run(cfg=cfg, data_cfg=data_cfg, ranks=ranks, device=device, out_dir=out_dir, run_name=run_name,
              precision=precision, batching=batching, tokenizer=tokenizer, weights=weights, scorer=scorer,
              optimizer=optimizer, scheduler=scheduler, examples=examples, val_examples=val_examples, lengths=lengths,
              flipped=torch.tensor([ex.flipped for ex in examples], dtype=torch.float32, device=device),
              eps=eps, pair_eps=pair_eps.to(device) if pair_eps is not None else None, ref=ref, val_ref=val_ref,
              reference=reference, plan=plan, total_steps=total_steps, start_step=start_step)
    if last:
        resume(weights.policy, optimizer, scheduler, last, cfg.model)
        print(f"resumed from {last} (step {start_step} of {total_steps})")
    weights.sync()
    truncated = sum(ex.truncated for ex in examples)
    run.info = {
        "run": run_name, "output_dir": str(out_dir), "data": asdict(data_cfg), "train": asdict(cfg),
        "files": {"train": str(train_path), "train_sha256": sha256_file(train_path),
                  "val": str(val_path) if val_path else None,
                  "val_sha256": sha256_file(val_path) if val_path else None},
        "resolved_model": models.resolve(cfg.model), "pairs": len(examples), "val_pairs": len(val_examples),
        "flipped": sum(ex.flipped for ex in examples), "truncated_pairs": truncated,
        **recorded(choice), "compiled": compiled, "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "batching": asdict(batching), "total_steps": total_steps, "batch_size": batching.step_pairs,
        "reference_cache": str(ref_scorer.cache_path), "eps": eps, "label_fix": fixed,
        "reference_pairs_computed": computed, "reference_seconds": reference_seconds,
        "git_commit": git_commit(), "device": str(device), "processes": ranks.world,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if ranks.main:
        atomic_write_json(out_dir / "config.json", run.info, indent=1)
    if truncated and ranks.main:
        print(f"note: {truncated} of {len(examples)} pairs were cut to --max-length {cfg.max_length}")
    return run


def tokenize_apart(tokenizer, pairs: list, max_length: int, path) -> list:
    """`tokenize_pairs`, refusing a --max-length that cuts the two responses of a pair to the same tokens (such a
    pair is a tie: it trains nothing and counts half in every accuracy), naming the smallest that keeps every pair
    apart: responses are cut to max_length - 1 tokens, so a pair whose token lists first differ at index d needs
    d + 2."""
    examples = tokenize_pairs(tokenizer, pairs, max_length)
    same = [i for i, ex in enumerate(examples) if ex.chosen == ex.rejected]
    need = 0
    for i in same:
        chosen, rejected = tokenizer([pairs[i]["chosen"], pairs[i]["rejected"]], add_special_tokens=False)["input_ids"]
        if chosen == rejected:
            raise InputError(f"{path}: pair {i}: chosen and rejected are different texts with the same tokens")
        need = max(need, 2 + next((d for d, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                                  min(len(chosen), len(rejected))))
    if same:
        raise InputError(f"{path}: --max-length {max_length} cuts chosen and rejected to the same tokens in "
                         f"{len(same)} of {len(examples)} pairs (the first: pair {same[0]}), which then train "
                         f"nothing: use --max-length {need} or more")
    return examples


def evaluate(run: Run) -> tuple:
    """Loss, rewards and reward accuracy on the clean validation pairs, and each pair's margin beta * h (for paired
    tests between runs on the same pairs). In fp32 whatever the training precision: the fp32 master weights
    against the fp32 reference log-probs, so bf16 and fp32 runs are measured alike (bf16 log-prob sums are off by
    about as much as the margins the studies compare)."""
    policy = logprobs_in_batches(run.weights.policy, run.val_examples, token_budget(run.device),
                                 run.tokenizer.pad_token_id)
    loss = losses.dpo_loss(run.cfg.loss, *policy, *run.val_ref, run.cfg.beta, run.eps)
    sums = pair_stats(loss, policy, run.val_ref, run.cfg.beta, torch.zeros(len(policy.chosen)), TIE["fp32"])
    values = summarize(sums.tolist())
    return values, (run.cfg.beta * losses.margins(*policy, *run.val_ref)).tolist()


# ---------------------------------------------------------------------------------------------------- one step

def accumulate(run: Run, micro_batches: list, n_step: int, weight: float = 1.0) -> torch.Tensor:
    """Forward and backward of this process's micro-batches of a step of n_step pairs; the gradients of the step's
    mean loss end in the master weights. With several processes only the last backward synchronizes (it
    all-reduces the gradients accumulated so far). weight 0: take part in the all-reduce without contributing.
    Returns the STATS sums and the real token count, as one tensor."""
    cfg, tokens = run.cfg, 0
    sums = torch.zeros(len(STATS), device=run.device)
    scale = weight * run.ranks.world / n_step  # DDP averages over processes; x world makes it their sum
    for k, mb in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        batch = collate([run.examples[i] for i in mb], run.tokenizer.pad_token_id)
        index = torch.tensor(mb, device=run.device)
        with accumulating(run.scorer, run.ranks, last):
            policy = Logps(*run.scorer(batch))  # (DistributedDataParallel may hand back a plain tuple)
            if run.reference is not None:
                with torch.no_grad():
                    ref = pair_logprobs(run.reference, batch)
            else:
                ref = run.ref.take(index)
            eps = run.pair_eps[index] if run.pair_eps is not None else run.eps
            loss = losses.dpo_loss(cfg.loss, *policy, *ref, cfg.beta, eps)
            (loss.sum() * scale).backward()  # exact accumulation: the step's mean over all its pairs
        if run.ranks.world == 1 or last:  # (with several processes, bf16 gradients add up until the all-reduce)
            run.weights.collect_grads()
        if weight:
            sums += pair_stats(loss.detach(), policy.detach(), ref, cfg.beta, run.flipped[index], TIE[run.precision])
            tokens += batch["tokens"]
    return torch.cat([sums, torch.tensor([float(tokens)], device=run.device)])


def train_step(run: Run, step: int) -> dict:
    """Optimizer step `step` (0-based) of the plan: this process's share of its pairs in micro-batches, then clip,
    check, update. On CUDA with automatic batching, a step that runs out of memory is redone in smaller
    micro-batches (the same update)."""
    t0 = time.perf_counter()
    pairs = run.plan[step]
    mine, weight = run.ranks.share(pairs), 1.0
    if not mine:  # a short last step with fewer pairs than processes
        mine, weight = pairs[:1], 0.0
    while True:
        micro_batches = run.batching.split(mine, run.lengths)
        try:
            sums = accumulate(run, micro_batches, len(pairs), weight)
            break
        except torch.OutOfMemoryError:
            largest = max(len(mb) * max(run.lengths[i] for i in mb) for mb in micro_batches)
            if not run.batching.adaptive or largest <= 1:
                raise
            run.weights.clear_grads()
            torch.cuda.empty_cache()
            run.batching.max_tokens = largest // 2
            tqdm.write(f"note: out of GPU memory at {largest} tokens per micro-batch; now at most "
                       f"{run.batching.max_tokens} (same update, more micro-batches)")
    run.ranks.sum(sums)
    max_norm = run.cfg.max_grad_norm if run.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.weights.params, max_norm)
    *sums, tokens, grad_norm = torch.cat([sums, grad_norm.reshape(1).float().to(sums.device)]).tolist()  # 1 sync
    values = summarize(sums)
    if not (math.isfinite(values["loss"]) and math.isfinite(grad_norm)):
        last = (checkpoints(run.out_dir) or ["none"])[-1]
        raise TrainingDiverged(f"non-finite loss or gradient at step {step + 1} (loss {values['loss']}, "
                               f"grad norm {grad_norm}); last good checkpoint: {last}")
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.weights.sync()
    seconds = time.perf_counter() - t0
    values.update({"lr": lr, "grad_norm": grad_norm, "seconds": seconds, "pairs_per_s": len(pairs) / seconds,
                   "tokens": int(tokens), "tokens_per_s": tokens / seconds, "micro_batches": len(micro_batches),
                   "peak_memory_mb": peak_memory_mb(run.device)})
    return values


# ------------------------------------------------------------------------------------------------------- train

def validate(run: Run, logger: Logger, step: int) -> dict:
    """Loss, rewards and reward accuracy on the validation pairs after `step`, logged (unless a resumed run logged
    them before), and each pair's margin into val_margins.json."""
    values, margins = evaluate(run)
    if (step, "val") not in logger.logged:
        logger.log(step, values, "val")
    atomic_write_json(run.out_dir / "val_margins.json", {
        "step": step, "beta": run.cfg.beta, "tie": run.cfg.beta * TIE["fp32"], "margins": margins})
    return values


def train(data_cfg: DataConfig, cfg: TrainConfig) -> dict:
    """Train (or continue with cfg.resume) the run, validate and save it; its summary. A resumed run that had
    finished is left as it was (its summary is returned); one that stopped after its last step is validated and
    saved."""
    try:
        run = setup(data_cfg, cfg)
    except AlreadyFinished as finished:
        return finished.summary
    cfg, main = run.cfg, run.ranks.main
    logger = Logger(run.out_dir, run.start_step) if main else None
    if main and run.start_step == 0 and run.info.get("label_fix"):
        logger.log(0, audit_scalars(run.info["label_fix"]), "audit")
    stop = {"requested": False}

    def on_stop_signal(signum, frame):  # Ctrl-C, or SIGTERM (e.g. Slurm's time limit): checkpoint, then stop
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if main:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            tqdm.write(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous_handlers = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    last_val, last_ckpt = {}, (checkpoints(run.out_dir) or [None])[-1]
    train_seconds, trained_pairs = 0.0, 0
    bar = tqdm(range(run.start_step, run.total_steps), initial=run.start_step, total=run.total_steps,
               desc=run.run_name, disable=not main)
    try:
        for step in bar:
            values = train_step(run, step)
            train_seconds, trained_pairs = train_seconds + values["seconds"], trained_pairs + len(run.plan[step])
            done, stopping = step + 1 == run.total_steps, agreed(run.ranks, stop["requested"])
            if main:
                logger.log(step + 1, values, "train")
                if run.val_examples and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
                    last_val = validate(run, logger, step + 1)
                bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracy']:.2f}",
                                val_acc=f"{last_val.get('rewards/accuracy', float('nan')):.2f}",
                                pairs_s=f"{values['pairs_per_s']:.2f}")
                if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (done and cfg.save_final) or stopping:
                    last_ckpt = save_checkpoint(run.out_dir, step + 1, run.weights.policy, run.tokenizer,
                                                run.optimizer, run.scheduler, settings=run.info.get("settings"),
                                                keep=cfg.keep_checkpoints)
            if stopping:
                if main:
                    print(f"stopped at step {step + 1}; continue with --resume (checkpoint {last_ckpt})")
                run.ranks.barrier()
                return {"out_dir": str(run.out_dir), "step": step + 1, "stopped": True}
        if main and run.start_step == run.total_steps and run.val_examples:  # stopped after its last step
            last_val = validate(run, logger, run.total_steps)
        summary = {"run": run.run_name, "out_dir": str(run.out_dir), "steps": run.total_steps,
                   "final": str(run.out_dir / "final") if cfg.save_final else None, "val": last_val,
                   "train_seconds": train_seconds, "pairs_trained": trained_pairs, "resumed_at": run.start_step,
                   "reference_seconds": run.info["reference_seconds"], "peak_memory_mb": peak_memory_mb(run.device),
                   "processes": run.ranks.world}
        if main:
            finalize(run, last_ckpt, summary)  # under the run folder's lock, like the training
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        bar.close()
        if main:
            logger.close()
            run.lock.close()
    run.ranks.barrier()
    return summary


def finalize(run: Run, last_ckpt: Path, summary: dict) -> None:
    """The final policy as a plain HF folder (loadable with AutoModelForCausalLM), then summary.json."""
    if run.cfg.save_final:
        write_final(last_ckpt, run.out_dir)
    atomic_write_json(run.out_dir / "summary.json", summary, indent=1)
    print(f"done: {run.out_dir} (policy in {summary['final'] or 'none: --save-final false'}; "
          "curves: make tensorboard)")
    if summary["val"]:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["val"].items()))
