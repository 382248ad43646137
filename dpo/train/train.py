"""`dpo train`: DPO against a frozen reference model, as one plain loop. Read it top to bottom:

    setup(data_cfg, cfg) -> Run    check and read the inputs, lock the run folder, then `build` the run: the policy,
                                   the label fix, the step plan, reference log-probs, the optimizer, resume
    train_step(run, step) -> dict  the step: this process's micro-batches (`accumulate`; the reference log-probs of
                                   each from `reference_logps`), exact gradient accumulation, clip, update
    train(data_cfg, cfg)           setup, the loop (step, log, validate, checkpoint, stop on a signal), finalize

Nothing happens in callbacks; benchmarks and tests call these same functions. Its parts are modules that take what
they use, never a whole `Run` (docs/architecture.md): plan, precision, distributed, reference, label_fix, stepstats,
checkpoint, runfolder, models, lora.
"""

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from dpo.audit.label_fix import Corrected, audit_scalars, correct_labels, fix_line
from dpo.core import dashboards, losses, models
from dpo.core.config import DataConfig, TrainConfig
from dpo.core.files import InputError, TrainingDiverged, atomic_write_json, check_writable, sha256_file, shown_path
from dpo.core.metrics import EVAL
from dpo.core.truncation import TRUNCATIONS
from dpo.data.pairs import read_pairs
from dpo.data.prepare import ensure_pairs
from dpo.data.sources import ChatTemplate
from dpo.engine import lora
from dpo.engine.distributed import Dist, StopSignals, accumulating, agreed, init_distributed, pair_scorer
from dpo.engine.logprobs import (
    Logps,
    Tokenized,
    collate,
    logprobs_in_batches,
    pair_logprobs,
    response_lengths,
    tokenize_apart,
)
from dpo.engine.precision import REFERENCE, TIE, Weights, choose, recorded
from dpo.engine.reference import ReferencePass, Scorer, reference_pass, token_budget
from dpo.train import checkpoint, runsettings
from dpo.train.checkpoint import AlreadyFinished, check_resume, checkpoints, resume, save_checkpoint, write_final
from dpo.train.plan import Batching, Plan, lr_factor, plan_steps, resolve_batching
from dpo.train.runfolder import Logger, check_output_dir, machine, peak_memory_mb, started
from dpo.train.stepstats import STATS, pair_stats, summarize


@dataclass
class Run:
    """Everything one training run holds: built by `setup`, advanced by `train_step`, closed by `train`."""
    cfg: TrainConfig
    data_cfg: DataConfig
    ranks: Dist  # this process among the training processes, and its device
    out_dir: Path
    run_name: str
    precision: str  # "fp32" or "bf16"
    batching: Batching
    tokenizer: object
    weights: Weights  # the fp32 master weights (.policy) and what forward and backward run in (.model: the
    # policy, or its bf16 copy; maybe compiled)
    scorer: torch.nn.Module  # PairScorer(weights.model), wrapped in DistributedDataParallel with several processes
    optimizer: torch.optim.Optimizer
    scheduler: object
    examples: list  # the training pairs, tokenized
    val_examples: list
    flipped: torch.Tensor  # [N] on the device
    eps: float  # the loss's eps: --eps, or the audit's estimate (--eps auto|posterior)
    pair_eps: torch.Tensor  # [N] per-pair flip posteriors on the device (--eps posterior), else None
    ref: Logps  # [N] each, on the device, or None with a reference model
    val_ref: Logps
    reference: object  # --ref-on-the-fly: the frozen reference model (LoRA: the policy, its adapters off); else None
    plan: Plan
    start_step: int
    info: dict = field(default_factory=dict)  # what config.json records about the setup
    lock: object = None  # the open lock file of the run folder

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def total_steps(self) -> int:
        return len(self.plan)


# ------------------------------------------------------------------------------------------------------ setup

class Inputs(NamedTuple):
    """What `setup` reads before it touches the run folder."""
    tokenizer: object
    train_path: Path
    val_path: Path  # or None
    train_pairs: list
    val_pairs: list  # the first --val-size of the validation file's
    run_name: str
    out_dir: Path


def setup(data_cfg: DataConfig, cfg: TrainConfig) -> Run:
    """Check the settings, read the pairs, lock the run folder, then build the run (`build`). A start that fails
    leaves nothing behind."""
    data_cfg, cfg = data_cfg.validate(), cfg.validate()
    dashboards.check_installed(cfg.report_to)  # before anything is loaded, not mid-run
    ranks = init_distributed(cfg.device)
    models.set_threads(cfg.threads)
    inputs = read_inputs(data_cfg, cfg)
    out_dir = inputs.out_dir
    check_output_dir(out_dir)
    if not cfg.resume and checkpoints(out_dir):
        raise InputError(f"{out_dir} already has checkpoints: pass --resume to continue, or another --run-name")
    check_writable(out_dir, "the run folder")
    check_writable(cfg.cache_dir, "the reference cache folder")
    with started(out_dir, ranks.main) as lock:
        settings = runsettings.of_run(cfg, data_cfg.seed, inputs.tokenizer, inputs.train_path, inputs.val_path,
                                      ranks.device, ranks.world)
        if cfg.resume:
            check_resume(out_dir, settings, ranks.main)
        run = build(data_cfg, cfg, ranks, inputs)
    run.info["settings"] = settings
    run.lock = lock
    return run


def read_inputs(data_cfg: DataConfig, cfg: TrainConfig) -> Inputs:
    """The tokenizer (a model that cannot load fails before any data is made), the pair files (made from the data
    flags when none is given), their pairs, the run's name and folder."""
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.train_data_path:
        train_path, val_path = Path(cfg.train_data_path), None
    else:
        train_path, val_path = ensure_pairs(data_cfg, model=cfg.model)
    val_path = Path(cfg.val_data_path) if cfg.val_data_path else val_path
    chat = ChatTemplate(cfg.model)  # renders conversational rows, loaded only for them
    train_pairs = read_pairs(train_path, chat)
    val_pairs = read_pairs(val_path, chat) if val_path else []
    if cfg.val_size:
        val_pairs = val_pairs[: cfg.val_size]
    run_name = cfg.run_name or f"{models.slug(cfg.model)}-{train_path.stem}-{cfg.loss}"
    out_dir = Path(cfg.output_dir or Path("runs") / run_name)
    return Inputs(tokenizer, train_path, val_path, train_pairs, val_pairs, run_name, out_dir)


def build(data_cfg: DataConfig, cfg: TrainConfig, ranks: Dist, inputs: Inputs) -> Run:
    """The policy, the label fix, the step plan, the compute copy, the reference log-probs of the pairs the run
    will use, the optimizer; resumed from the newest checkpoint with --resume. Writes config.json."""
    device, tokenizer = ranks.device, inputs.tokenizer
    torch.manual_seed(data_cfg.seed)
    random.seed(data_cfg.seed)
    np.random.seed(data_cfg.seed)
    policy = models.load_model(cfg.model, dtype=torch.float32, device=device)
    models.disable_dropout(policy)
    if cfg.lora_r:  # the base frozen, adapters that compute nothing yet (dpo/engine/lora.py)
        lora.add_adapters(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, cfg.model)
    choice = choose(cfg.precision, device)
    weights = Weights(policy, choice["precision"] == "bf16")
    # the fp32 policy *is* the reference before its first step: it scores what the cache lacks (in fp32 whatever
    # the training precision, so fp32 and bf16 runs share entries; a LoRA policy with its adapters off, so LoRA and
    # full runs share them too), unless a reference copy is kept
    ref_scorer = Scorer.of(policy, tokenizer, cfg.model, cfg.max_length, REFERENCE, cfg.cache_dir, cfg.append_eos,
                           cfg.truncation_mode)
    if losses.get(cfg.loss).trl_differs and ranks.main:
        print(f"note: --loss {cfg.loss}: {losses.get(cfg.loss).trl_differs}")
    fixed = correct_labels(cfg, ref_scorer, inputs.train_pairs, inputs.train_path, inputs.val_path, ranks)
    if fixed.info and ranks.main:
        print(fix_line(fixed.info))
    train = Tokenized(fixed.pairs, tokenize_apart(tokenizer, fixed.pairs, cfg.max_length, inputs.train_path,
                                                  cfg.append_eos, cfg.truncation_mode))
    val = Tokenized(inputs.val_pairs, tokenize_apart(tokenizer, inputs.val_pairs, cfg.max_length, inputs.val_path,
                                                     cfg.append_eos, cfg.truncation_mode))
    batching = resolve_batching(cfg, device)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(train.examples) / batching.step_pairs)
    plan = plan_steps([ex.length for ex in train.examples], batching.step_pairs, total_steps, data_cfg.seed)
    last = checkpoints(inputs.out_dir)[-1] if cfg.resume and checkpoints(inputs.out_dir) else None
    start_step = checkpoint.checkpoint_info(last)["step"] if last else 0
    compiled = models.prepare_for_training(weights.model, cfg.gradient_checkpointing, cfg.compile, device)
    reference = None
    if cfg.ref_on_the_fly:  # a LoRA policy is its own reference, with its adapters off: no second copy
        reference = policy if cfg.lora_r else models.frozen_reference(cfg.model, device)
    needed = None if cfg.ref_on_the_fly else plan.used(start_step)
    refs = reference_pass(replace(ref_scorer, model=reference or policy), ranks, train, needed, val)
    weights.model.train()
    scorer = pair_scorer(weights.model, ranks)
    optimizer = torch.optim.AdamW(weights.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_scheduler_type))
    run = Run(cfg=cfg, data_cfg=data_cfg, ranks=ranks, out_dir=inputs.out_dir, run_name=inputs.run_name,
              precision=choice["precision"], batching=batching, tokenizer=tokenizer, weights=weights,
              scorer=scorer, optimizer=optimizer, scheduler=scheduler,
              examples=train.examples, val_examples=val.examples,
              flipped=torch.tensor([ex.flipped for ex in train.examples], dtype=torch.float32, device=device),
              eps=fixed.eps, pair_eps=fixed.pair_eps.to(device) if fixed.pair_eps is not None else None,
              ref=refs.ref, val_ref=refs.val_ref, reference=reference, plan=plan, start_step=start_step)
    if last:
        resume(weights.policy, optimizer, scheduler, last, cfg.model)
        print(f"resumed from {last} (step {start_step} of {total_steps})")
    weights.sync()
    run.info = config_record(run, inputs, choice, compiled, str(ref_scorer.cache_path), fixed, refs)
    truncated = run.info["truncated_pairs"]
    if ranks.main:
        atomic_write_json(run.out_dir / "config.json", run.info, indent=1)
    if truncated and ranks.main:
        print(f"note: {truncated} of {len(run.examples)} pairs were cut to --max-length {cfg.max_length} "
              f"(--truncation-mode {cfg.truncation_mode}): {TRUNCATIONS[cfg.truncation_mode].trl_differs}")
    return run


def config_record(run: Run, inputs: Inputs, choice: dict, compiled: bool, cache: str, fixed: Corrected,
                  refs: ReferencePass) -> dict:
    """What config.json records about the setup: every resolved setting, the data files and their sha256, the
    reference pass, the git commit, the versions and the device."""
    cfg, train_path, val_path = run.cfg, inputs.train_path, inputs.val_path
    return {
        "run": run.run_name, "output_dir": str(run.out_dir), "data": asdict(run.data_cfg), "train": asdict(cfg),
        "files": {"train": shown_path(train_path), "train_sha256": sha256_file(train_path),
                  "val": shown_path(val_path) if val_path else None,
                  "val_sha256": sha256_file(val_path) if val_path else None},
        "resolved_model": shown_path(models.resolve(cfg.model)), "pairs": len(run.examples),
        "val_pairs": len(run.val_examples),
        "flipped": sum(ex.flipped for ex in run.examples), "truncated_pairs": sum(ex.truncated for ex in run.examples),
        **recorded(choice), "compiled": compiled, "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "lora": lora.describe(run.weights.policy),
        "batching": asdict(run.batching), "total_steps": run.total_steps, "batch_size": run.batching.step_pairs,
        "reference_cache": cache, "eps": fixed.eps, "label_fix": fixed.info,
        "reference_pairs_computed": refs.computed, "reference_seconds": refs.seconds,
        **machine(run.device, run.ranks.world),
    }


# --------------------------------------------------------------------------------------------------- the step

def reference_logps(run: Run, batch: dict, index: torch.Tensor) -> Logps:
    """The reference's log-probs of a micro-batch: the reference model run on it (--ref-on-the-fly: a frozen copy,
    or a LoRA policy with its adapters off), else the cached ones of its pairs (`index`)."""
    if run.reference is None:
        return run.ref.take(index)
    with torch.no_grad(), lora.adapters_off(run.reference):
        return pair_logprobs(run.reference, batch)


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
        examples = [run.examples[i] for i in mb]
        batch = collate(examples, run.tokenizer.pad_token_id)
        index = torch.tensor(mb, device=run.device)
        with accumulating(run.scorer, run.ranks, last):
            policy = Logps(*run.scorer(batch))  # (DistributedDataParallel may hand back a plain tuple)
            ref = reference_logps(run, batch, index)
            eps = run.pair_eps[index] if run.pair_eps is not None else run.eps
            loss = losses.dpo_loss(cfg.loss, *policy, *ref, cfg.beta, eps, response_lengths(examples, run.device))
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
        micro_batches = run.batching.split(mine, run.plan.lengths)
        try:
            sums = accumulate(run, micro_batches, len(pairs), weight)
            break
        except torch.OutOfMemoryError:
            if not run.batching.shrink(micro_batches, run.plan.lengths):
                raise
            run.weights.clear_grads()
            torch.cuda.empty_cache()
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


# ------------------------------------------------------------------------------------------------- validation

class Validation(NamedTuple):
    values: dict  # loss, rewards, accuracies: the means of STATS
    margins: list  # each pair's margin beta * h


def validation_pass(run: Run) -> Validation:
    """Loss, rewards and reward accuracy on the clean validation pairs, and each pair's margin beta * h (for paired
    tests between runs on the same pairs). In fp32 whatever the training precision: the fp32 master weights
    against the fp32 reference log-probs, so bf16 and fp32 runs are measured alike (bf16 log-prob sums are off by
    about as much as the margins the studies compare)."""
    policy = logprobs_in_batches(run.weights.policy, run.val_examples, token_budget(run.device),
                                 run.tokenizer.pad_token_id, progress=f"{run.run_name}: validation" if run.ranks.main
                                 else "")
    loss = losses.dpo_loss(run.cfg.loss, *policy, *run.val_ref, run.cfg.beta, run.eps,
                           response_lengths(run.val_examples))
    sums = pair_stats(loss, policy, run.val_ref, run.cfg.beta, torch.zeros(len(policy.chosen)), TIE["fp32"])
    return Validation(summarize(sums.tolist()), (run.cfg.beta * losses.margins(*policy, *run.val_ref)).tolist())


def validate(run: Run, logger: Logger, step: int) -> dict:
    """The validation pass after `step`, logged (unless a resumed run logged it before), and each pair's margin
    into val_margins.json."""
    values, margins = validation_pass(run)
    if (step, EVAL) not in logger.logged:
        logger.log(step, values, EVAL)
    atomic_write_json(run.out_dir / "val_margins.json", {
        "step": step, "beta": run.cfg.beta, "tie": run.cfg.beta * TIE["fp32"], "margins": margins})
    return values


# --------------------------------------------------------------------------------------------------- the loop

def train(data_cfg: DataConfig, cfg: TrainConfig) -> dict:
    """Train (or continue with cfg.resume) the run, validate and save it; its summary. A resumed run that had
    finished is left as it was (its summary is returned); one that stopped after its last step is validated and
    saved."""
    try:
        run = setup(data_cfg, cfg)
    except AlreadyFinished as finished:
        return finished.summary
    main = run.ranks.main
    logger = Logger(run.out_dir, run.start_step, run.cfg.report_to, run.run_name,
                    {"data": asdict(run.data_cfg), "train": asdict(run.cfg)}) if main else None
    if main and run.start_step == 0 and run.info.get("label_fix"):
        logger.log(0, audit_scalars(run.info["label_fix"]), "audit")
    bar = tqdm(range(run.start_step, run.total_steps), initial=run.start_step, total=run.total_steps,
               desc=run.run_name, disable=not main)
    try:
        with StopSignals(announce=main) as stop:
            summary = loop(run, logger, bar, stop)
    finally:
        bar.close()
        if main:
            logger.close()
            run.lock.close()
    if not summary.get("stopped"):  # (the processes of a stopped run met before it closed its folder)
        run.ranks.barrier()
    return summary


def loop(run: Run, logger: Logger, bar, stop: StopSignals) -> dict:
    """The steps of `bar`, each logged; validation and checkpoints when due; a stop that any process asks for ends
    every process after the same step, with a checkpoint. Then the summary, written by `finalize`."""
    cfg, main = run.cfg, run.ranks.main
    last_val, last_ckpt = {}, (checkpoints(run.out_dir) or [None])[-1]
    train_seconds, trained_pairs = 0.0, 0
    for step in bar:
        values = train_step(run, step)
        train_seconds, trained_pairs = train_seconds + values["seconds"], trained_pairs + len(run.plan[step])
        done, stopping = step + 1 == run.total_steps, agreed(run.ranks, stop.requested)
        if main:
            logger.log(step + 1, values, "train")
            if run.val_examples and (every(cfg.eval_every, step + 1) or done):
                last_val = validate(run, logger, step + 1)
            shown = {"loss": f"{values['loss']:.4f}", "acc": f"{values['rewards/accuracies']:.2f}"}
            if "rewards/accuracies" in last_val:  # none before the first validation pass (not "nan")
                shown["val_acc"] = f"{last_val['rewards/accuracies']:.2f}"
            bar.set_postfix(**shown, pairs_s=f"{values['pairs_per_s']:.2f}")
            if every(cfg.save_every, step + 1) or (done and cfg.save_final) or stopping:
                last_ckpt = save_checkpoint(run.out_dir, step + 1, run.weights.policy, run.tokenizer, run.optimizer,
                                            run.scheduler, settings=run.info.get("settings"),
                                            keep=cfg.keep_checkpoints)
        if stopping:
            if main:
                print(f"stopped at step {step + 1}; continue with --resume (checkpoint {last_ckpt})")
            run.ranks.barrier()
            return {"out_dir": str(run.out_dir), "step": step + 1, "stopped": True}
    if main and run.start_step == run.total_steps and run.val_examples:  # stopped after its last step
        last_val = validate(run, logger, run.total_steps)
    summary = {"run": run.run_name, "out_dir": str(run.out_dir), "steps": run.total_steps,
               "final": str(run.out_dir / "final") if cfg.save_final else None, EVAL: last_val,
               "train_seconds": train_seconds, "resumed_at": run.start_step,  # (the seconds of this session)
               "pairs_trained": run.plan.pairs(), "pairs_this_session": trained_pairs,  # the whole run's; this one's
               "reference_seconds": run.info["reference_seconds"], "peak_memory_mb": peak_memory_mb(run.device),
               "processes": run.ranks.world}
    if main:
        finalize(run, last_ckpt, summary)  # under the run folder's lock, like the training
    return summary


def every(k: int, step: int) -> bool:
    """Whether `step` is due for something done every k steps (k 0: never)."""
    return bool(k) and step % k == 0


# --------------------------------------------------------------------------------------------------- finalize

def finalize(run: Run, last_ckpt: Path, summary: dict) -> None:
    """The final policy as a plain HF folder (loadable with AutoModelForCausalLM), then summary.json."""
    if run.cfg.save_final:
        write_final(last_ckpt, run.out_dir, run.weights.policy, run.tokenizer)
    atomic_write_json(run.out_dir / "summary.json", summary, indent=1)
    print(f"done: {run.out_dir} (policy in {summary['final'] or 'none: --save-final false'}; "
          "curves: make tensorboard)")
    if summary[EVAL]:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary[EVAL].items()))
