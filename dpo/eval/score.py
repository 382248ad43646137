"""`dpo eval`: HellaSwag accuracy of a causal LM, scored two ways, fast and exactly.

completion  lm-evaluation-harness's `hellaswag` task, 0-shot: loglik(ending) = sum of log p(token) over the tokens
            of " " + ending after the harness's query. acc = argmax of loglik, acc_norm = argmax of
            loglik / len(ending) in characters (without the leading space, like the harness).
mc          the training prompt (`pairs.mc_prompt`: k solved examples drawn as for the pairs, then the item,
            ending at "Best Continuation:"), tokenized like the trainer: log p(" 0") .. log p(" 3") after it.
            mc_acc = argmax == gold. (GPT-2 has one token per answer; SmolLM2 splits " 2" into " " + "2": the
            shared " " adds the same log-prob to all four.)

Both score continuations after a shared prefix with the trainer's engine (`logprobs`). An item is one packed row

    [prefix + common | ending 0 | ending 1 | ending 2 | ending 3]      (each ending without its last token)

(common: the tokens all four endings start with, usually none; an ending above is what follows them). The endings
restart their position ids after prefix + common and attend only to it and to themselves (`block_causal_mask`):
the prefix is computed once, not four times, and vocabulary logits are computed only where a token is scored.
One-token mc answers (GPT-2) leave nothing to input after the prefix: a plain causal row, no block mask. `fit`
cuts long prefixes like the harness. The numbers equal four separate forward passes (`naive_logliks`; the tests
check 1e-5 on GPT-2 and Llama, and every run checks its first item).
"""

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dpo.core import metrics, models, stats
from dpo.core.config import DataConfig, EvalConfig
from dpo.core.files import InputError, atomic_write_text, json_text, read_bytes, read_json, sha256_file, shown_path
from dpo.data import pairs
from dpo.data.hellaswag import harness_endings, harness_query
from dpo.engine.logprobs import Request, collate_packed, pack, packed_logprobs

RUNS = Path("runs")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization, exactly as lm-evaluation-harness 0.4.13 does it for HF causal LMs (api/model.py `loglikelihood`,
# `_encode_pair`; models/huggingface.py `tok_encode`, `prefix_token_id`).

def prefix_token_id(tokenizer) -> int:
    """What an empty context is replaced with: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def harness_encode(tokenizer, text: str) -> list:
    """HFLM.tok_encode: the tokenizer's own default special tokens (the harness leaves BOS to the tokenizer),
    none when the text already starts with the BOS text. GPT-2 and SmolLM2 tokenizers add none."""
    bos = tokenizer.decode([prefix_token_id(tokenizer)])
    return tokenizer.encode(text, add_special_tokens=not text.startswith(bos))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) of a loglikelihood request. Trailing whitespace of the context moves to the
    continuation; context + continuation is encoded whole and split after len(encode(context)) tokens, so a
    token merging across the boundary counts for the continuation. An empty context becomes the prefix token."""
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        first = prefix_token_id(tokenizer)
        return ([first], cont) if cont[:1] != [first] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = harness_encode(tokenizer, context + continuation), harness_encode(tokenizer, context)
    return ctx or [prefix_token_id(tokenizer)], whole[len(ctx):]  # (a whitespace-only context: the harness fails)


# ---------------------------------------------------------------------------------------------------------------
# Requests: continuations (token-id lists) to score after one shared prefix (`logprobs.Request`).

def completion_request(tokenizer, item) -> Request:
    """The harness's 4 requests (query, " " + ending) of an item; they share the query's tokens."""
    query = harness_query(item)
    encoded = [encode_pair(tokenizer, query, " " + ending) for ending in harness_endings(item)]
    for j, (_, cont) in enumerate(encoded):
        if not cont:
            raise InputError(f"item {item.id}: ending {j} tokenizes to nothing")
    return Request(encoded[0][0], [cont for _, cont in encoded])


def mc_answer_tokens(tokenizer) -> list:
    """The token ids of " 0" .. " 3", encoded on their own as the trainer encodes a pair's responses."""
    answers = [tokenizer.encode(f" {k}", add_special_tokens=False) for k in range(4)]
    if not all(answers) or len({tuple(a) for a in answers}) != 4:
        raise InputError(f"this tokenizer encodes the mc answers ' 0'..' 3' as {answers}: not 4 distinct "
                         "token sequences; score this model with --metrics completion")
    return answers


def mc_request(tokenizer, item, fewshot, k: int, seed: int, answers) -> Request:
    """The item's mc prompt exactly as its validation pair has it (same shots for the same seed), tokenized like
    the trainer (prompt and answer separately, no special tokens), the 4 answers as continuations."""
    shots, _ = pairs.draw(item, fewshot, k, seed)
    return Request(tokenizer.encode(pairs.mc_prompt(item, shots), add_special_tokens=False), answers)


# ---------------------------------------------------------------------------------------------------------------
# Packing (`logprobs.pack`): one row per request, the prefix computed once.

def fit(request: Request, max_length: int) -> list:
    """(continuation indices, request) pairs that fit a model of max_length tokens, cut like the harness cuts:
    input = (prefix + continuation)[-(max_length + 1):][:-1]. When a continuation does not fit, the cuts differ
    between continuations, so each becomes its own request with its own cut prefix."""
    longest = max(len(c) for c in request.continuations)
    if longest > max_length:
        raise InputError(f"a continuation of {longest} tokens does not fit --max-length {max_length}")
    if len(request.prefix) + longest <= max_length + 1:
        return [(list(range(len(request.continuations))), request)]
    return [([j], Request(request.prefix[-(max_length + 1 - len(c)):], [c]))
            for j, c in enumerate(request.continuations)]


# ---------------------------------------------------------------------------------------------------------------
# Model math: `logprobs.packed_logprobs`, the trainer's engine, with the sums in float64.

@torch.inference_mode()
def score(model, requests: list, *, batch_size=16, max_length=1024, bf16=False, desc=None) -> list:
    """Summed log p(continuation | prefix) of every continuation of every request: [request][continuation]
    floats, as lm-evaluation-harness computes each (prefix, continuation). Rows go longest first, batch_size at
    a time; bf16 autocasts on CUDA (fp32 elsewhere)."""
    device = next(model.parameters()).device
    units = [(r, js, pack(fitted)) for r, request in enumerate(requests) for js, fitted in fit(request, max_length)]
    units.sort(key=lambda u: -len(u[2].tokens))
    out = [[None] * len(request.continuations) for request in requests]
    for start in tqdm(range(0, len(units), batch_size), desc=desc, disable=desc is None, unit="batch"):
        chunk = units[start:start + batch_size]
        with models.autocast(device) if bf16 else contextlib.nullcontext():
            sums = packed_logprobs(model, collate_packed([u[2] for u in chunk]), torch.float64).tolist()
        slot = 0
        for r, js, _ in chunk:
            for j in js:
                out[r][j] = sums[slot]
                slot += 1
    return out


@torch.inference_mode()
def naive_logliks(model, request: Request, max_length=1024) -> list:
    """The reference: per continuation, one full forward over (prefix + continuation)[-(max_length + 1):][:-1],
    log_softmax over all logits, summed at the continuation's positions (the harness's computation)."""
    device = next(model.parameters()).device
    out = []
    for cont in request.continuations:
        inp = (request.prefix + cont)[-(max_length + 1):][:-1]
        logits = model(torch.tensor([inp], device=device)).logits[0].float()
        logprobs = logits.log_softmax(-1)[len(inp) - len(cont):]
        out.append(logprobs.gather(-1, torch.tensor(cont, device=device)[:, None]).double().sum().item())
    return out


def check_fast_path(model, request: Request, max_length: int, tol=1e-3) -> None:
    """Packed scoring must equal full forward passes (fp32). Catches architectures whose logits are not
    lm_head(last hidden state) or that ignore custom masks or position ids."""
    fast = score(model, [request], batch_size=1, max_length=max_length)[0]
    slow = naive_logliks(model, request, max_length)
    worst = max(abs(f - s) for f, s in zip(fast, slow))
    if worst > tol:
        raise RuntimeError(f"packed scoring differs from full forward passes by {worst:.3g} on the first item "
                           f"({type(model).__name__} is not supported by the fast path)")


# ---------------------------------------------------------------------------------------------------------------
# `dpo eval`

def finished_at(run: Path) -> float:
    """When a finished run finished: its summary.json (written last), else its final/ folder."""
    summary = run / "summary.json"
    return (summary if summary.is_file() else run / "final").stat().st_mtime


def newest_run(root=RUNS) -> Path:
    """The finished run (config.json and final/) under root that finished last (not the one started last)."""
    runs = [p.parent for p in Path(root).glob("*/config.json") if (p.parent / "final").is_dir()
            and models.run_config(p.parent)]
    if not runs:
        raise InputError(f"no --model given and no finished training run under {root}/ (a folder with "
                         "config.json and final/): pass --model MODEL, or train one first with `make train`")
    return max(runs, key=finished_at)


def pick_models(cfg: EvalConfig) -> tuple:
    """(A, B or ""): --model and --model-b; without --model, the newest run and (unless --model-b) its base."""
    if cfg.model:
        return cfg.model, cfg.model_b
    run = newest_run()
    base = (models.run_config(run).get("train") or {}).get("model")
    if not cfg.model_b and not (isinstance(base, str) and base):
        raise InputError(f"{run}/config.json: no train.model (the base model); pass --model-b")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(finished_at(run)))
    print(f"note: no --model given: scoring {run}, the run that finished last ({when}), against "
          f"{cfg.model_b or base}", file=sys.stderr)
    return str(run), cfg.model_b or base


def scored_weights(spec: str, allow_partial: bool) -> tuple:
    """(what to load, what results.json records about it). A run folder: its final/ ({"weights": "final",
    "checkpoint_step": None}); a run still training is refused unless allow_partial, which scores its newest
    checkpoint (step N). Any other spec: itself, nothing recorded."""
    folder = Path(spec).expanduser()
    if models.run_config(folder) is None:
        return spec, {}
    weights, step = models.run_weights(folder)
    if step is not None and not allow_partial:
        raise InputError(f"{spec} is {models.run_state(folder, step)}: pass --allow-partial to score that "
                         "checkpoint")
    return str(weights), {"weights": weights.relative_to(folder).as_posix(), "checkpoint_step": step}


def default_out_dir(spec: str, step=None, setting: str = "") -> Path:
    """<run>/eval for a run folder (<run>/eval/step_NNNNNN for a checkpoint), else runs/eval/<spec as a name>/
    <setting>: a base model's results are kept per setting, not replaced by the next evaluation's."""
    folder = Path(spec).expanduser()
    if models.run_config(folder):
        return folder / "eval" if step is None else folder / "eval" / f"step_{step:06d}"
    return RUNS / "eval" / (re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._") or "model") / setting


SCORER_VERSION = 1  # raise when a change to the scoring changes its numbers: older results are then not reused


def results_key(weights: str, item_ids: list, sources: dict, settings: dict) -> str:
    """What a results.json is a function of: the weights (models.model_id), the items and their source files, the
    scorer settings and version. Equal keys: the same numbers, so an evaluation is reused rather than redone."""
    parts = {"weights": models.model_id(weights), "items": item_ids,
             "sources": {k: v["sha256"] for k, v in sources.items()}, "settings": settings,
             "scorer": SCORER_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def finished_results(out_dir: Path, key: str):
    """out_dir's results.json when it is complete and for `key`: written last, it records the sha256 and count of
    the predictions.jsonl it summarizes, and a mismatch (a kill between the two writes) means not done. Else None."""
    try:
        results = read_json(out_dir / "results.json", "the results.json of `dpo eval`")
        blob = read_bytes(out_dir / "predictions.jsonl", "the predictions.jsonl of `dpo eval`")
    except InputError:  # absent, cut short, nested too deeply, ...: scored again
        return None
    recorded = results.get("predictions") if isinstance(results, dict) else None
    if not isinstance(recorded, dict) or results.get("key") != key:
        return None
    if recorded.get("sha256") != hashlib.sha256(blob).hexdigest() or recorded.get("n") != blob.count(b"\n"):
        return None
    return results


EVAL_SET_KEYS = ("hellaswag_dir", "val_file", "item_order", "eval_start", "eval_size")
MC_PROMPT_KEYS = ("train_file", "train_from_val", "fewshot_file", "fewshot_indices", "fewshot", "seed")


def warn_data_mismatch(spec: str, data: DataConfig, scorings) -> None:
    """A run whose pairs were made from the data flags (no --train-data-path), evaluated with other settings for
    the evaluation set (its training items may overlap it) or, when mc is scored, for the mc prompts' shots."""
    config = models.run_config(Path(spec).expanduser()) or {}
    if (config.get("train") or {}).get("train_data_path"):
        return  # explicit pair files: the run's data flags made nothing
    trained = config.get("data") or {}
    for key in EVAL_SET_KEYS + (MC_PROMPT_KEYS if "mc" in scorings else ()):
        if key in trained and trained[key] != getattr(data, key):
            print(f"note: {spec} was trained with --{key.replace('_', '-')} {trained[key]!r}, this evaluation "
                  f"uses {getattr(data, key)!r}", file=sys.stderr)


OUTPUTS = ("results.json", "predictions.jsonl", "comparison.json")


def check_out_dir(out_dir: Path) -> None:
    """Before any scoring: out_dir is, or can become, a folder in which the output files can be replaced (a
    read-only folder or file system is found now, not after minutes of scoring)."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{existing}: not a folder, so the output folder {out_dir} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: not writable (read-only, or no permission), so {out_dir} cannot be written")
    for name in OUTPUTS:
        if (out_dir / name).is_dir():
            raise InputError(f"{out_dir / name}: a folder is in the way of the {name} this evaluation writes")


def write_outputs(out_dir: Path, texts: dict) -> None:
    """name -> text, each file written atomically; a failed write (disk full, no permission) is one error line."""
    for name, text in texts.items():
        try:
            atomic_write_text(out_dir / name, text)
        except OSError as e:
            raise InputError(f"{out_dir / name}: cannot write it ({e.strerror or e})") from None


def select_items(items, split: str, limit: int) -> list:
    if split:
        found = sorted({it.split_type for it in items if it.split_type})
        items = [it for it in items if it.split_type == split]
        if not items:
            raise InputError(f"--split {split!r}: no evaluation item has it (split_type values: {found or 'none'})")
    return items[:limit] if limit else items


def score_items(model, tokenizer, items, fewshot, scorings, data: DataConfig, cfg: EvalConfig, name="") -> tuple:
    """Per-item records (logliks, predictions, gold) and the seconds each scoring took."""
    records = [{"id": it.id, "gold": it.label, **({"split_type": it.split_type} if it.split_type else {})}
               for it in items]
    bf16 = next(model.parameters()).device.type == "cuda"
    common = {"batch_size": cfg.batch_size, "max_length": cfg.max_length, "bf16": bf16}
    seconds = {}
    if "completion" in scorings:
        requests = [completion_request(tokenizer, it) for it in items]
        check_fast_path(model, requests[0], cfg.max_length)
        t0 = time.perf_counter()
        logliks = score(model, requests, desc=f"completion {name}", **common)
        seconds["completion"] = time.perf_counter() - t0
        for rec, item, ll in zip(records, items, logliks):
            rec.update(completion_logliks=ll, ending_chars=[len(e) for e in harness_endings(item)])
    if "mc" in scorings:
        if data.fewshot > len(fewshot):
            raise InputError(f"--fewshot {data.fewshot}: the few-shot pool has only {len(fewshot)} items")
        answers = mc_answer_tokens(tokenizer)
        requests = [mc_request(tokenizer, it, fewshot, data.fewshot, data.seed, answers) for it in items]
        check_fast_path(model, requests[0], cfg.max_length)
        t0 = time.perf_counter()
        logprobs = score(model, requests, desc=f"mc {name}", **common)
        seconds["mc"] = time.perf_counter() - t0
        for rec, lp in zip(records, logprobs):
            rec.update(mc_logprobs=lp)
    for rec in records:
        rec.update(metrics.predictions(rec))
    return records, seconds


@dataclass
class Target:
    """One model to score, with everything that can fail checked before any scoring starts."""
    spec: str  # as given
    weights: str  # what is loaded: the spec, or a run folder's final/ or checkpoint
    recorded: dict  # for results.json: which weights of a run folder ({} for other specs)
    out_dir: Path
    tokenizer: object
    load_seconds: float
    key: str  # results_key: a finished results.json with this key is reused


def scoring_settings(cfg: EvalConfig, data: DataConfig, scorings, device, fewshot) -> dict:
    """The settings the numbers depend on (with the items and their sources, they make the results key)."""
    return {"metrics": scorings, "limit": cfg.limit, "split": cfg.split, "fewshot": data.fewshot, "seed": data.seed,
            "max_length": cfg.max_length, "device": device.type,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "fewshot_items": [it.id for it in fewshot] if "mc" in scorings else None}


def prepare(spec: str, out_dir: str, cfg: EvalConfig, items, sources: dict, settings: dict) -> Target:
    """The weights to score, the output folder and the tokenizer of one model: a run still training, an output
    folder in the way or a hub id out of reach fails here, not after the other model has been scored."""
    t0 = time.perf_counter()
    weights, recorded = scored_weights(spec, cfg.allow_partial)
    key = results_key(weights, [it.id for it in items], sources, settings)
    setting = f"{'-'.join(settings['metrics'])}_{len(items)}items_seed{settings['seed']}_{key[:8]}"
    out = Path(out_dir) if out_dir else default_out_dir(spec, recorded.get("checkpoint_step"), setting)
    check_out_dir(out)
    tokenizer = models.load_tokenizer(weights)
    return Target(spec, weights, recorded, out, tokenizer, time.perf_counter() - t0, key)


def score_model(target: Target, items, fewshot, scorings, data: DataConfig, cfg: EvalConfig, device, sources,
                settings: dict) -> list:
    """Load one model, score the items, write predictions.jsonl, then results.json (atomically, recording the
    predictions' sha256 and count); the records. Finished results for the same key are reused instead."""
    spec, out_dir = target.spec, target.out_dir
    if finished_results(out_dir, target.key):
        print(f"{spec}: reusing {out_dir}/results.json (the same weights, items and scoring settings; delete it "
              "to score again)")
        return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    t0 = time.perf_counter()
    model = models.load_model(target.weights, torch.float32, device).eval()
    load_seconds = target.load_seconds + time.perf_counter() - t0
    records, seconds = score_items(model, target.tokenizer, items, fewshot, scorings, data, cfg, name=Path(spec).name)
    total = sum(seconds.values())
    predictions = "".join(json_text(r) + "\n" for r in records)
    settings = {**settings, "eval_set": f"val[{data.eval_start}:{data.eval_start + data.eval_size}]"
                + (" of the shuffled items" if data.item_order == "shuffled" else ""),
                "batch_size": cfg.batch_size, "device": str(device),
                "mc_answer_tokens": mc_answer_tokens(target.tokenizer) if "mc" in scorings else None,
                "torch": torch.__version__, "transformers": _version("transformers"), "data_config": asdict(data)}
    results = {"model": spec, "model_path": shown_path(models.resolve(target.weights)), **target.recorded,
               "data": sources,
               **stats.summarize(records), "seconds": total, "items_per_s": len(items) / total,
               "seconds_by_metric": seconds, "load_seconds": load_seconds, "settings": settings, "key": target.key,
               "predictions": {"n": len(records),
                               "sha256": hashlib.sha256(predictions.encode("utf-8")).hexdigest()}}
    write_outputs(out_dir, {"predictions.jsonl": predictions,  # results.json last: it vouches for the predictions
                            "results.json": json_text(results, indent=1) + "\n"})
    shown = "  ".join(f"{m} {results[m]:.4f} ± {results[m + '_stderr']:.4f}"
                      for m in metrics.ACCURACIES if m in results)
    step = target.recorded.get("checkpoint_step")
    print(f"{spec}{f' (checkpoint step {step})' if step is not None else ''}: {shown}  ({len(items)} items, "
          f"{total:.1f} s, {results['items_per_s']:.2f} items/s) -> {out_dir}/results.json")
    return records


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def run(cfg: EvalConfig, data: DataConfig) -> dict:
    from dpo.data.prepare import load_splits

    cfg.validate()
    data.validate()
    scorings = cfg.metric_names()
    spec_a, spec_b = pick_models(cfg)
    device = models.pick_device(cfg.device)
    splits, files = load_splits(data)
    items = select_items(splits.eval, cfg.split, cfg.limit)
    sources = {k: {"path": str(p), "sha256": sha256_file(p)} for k, p in files.items()}
    settings = scoring_settings(cfg, data, scorings, device, splits.fewshot)
    targets = [prepare(spec, out_dir, cfg, items, sources, settings)
               for spec, out_dir in ((spec_a, cfg.out_dir), (spec_b, "")) if spec]
    if len(targets) == 2 and targets[0].out_dir.resolve() == targets[1].out_dir.resolve():
        raise InputError(f"--model and --model-b would both write to {targets[0].out_dir}: pass another --out-dir")
    scored = []
    for target in targets:
        warn_data_mismatch(target.spec, data, scorings)
        scored.append(score_model(target, items, splits.fewshot, scorings, data, cfg, device, sources, settings))
    if not spec_b:
        return {"a": scored[0]}
    comparison = stats.compare(scored[0], scored[1], cfg.bootstrap)
    print(stats.format_comparison(comparison, spec_a, spec_b))
    summary = {"a": spec_a, "b": spec_b, "n": len(items), "bootstrap_resamples": cfg.bootstrap,
               "bootstrap_seed": stats.BOOTSTRAP_SEED, "metrics": comparison}
    write_outputs(targets[0].out_dir, {"comparison.json": json_text(summary, indent=1) + "\n"})
    return {"a": scored[0], "b": scored[1], "comparison": comparison}
