"""All settings, in one place: a dataclass per command; argparse flags are generated from the fields.

Every field becomes `--field-name` (underscores are accepted too, so the original project's
`--learning_rate` style keeps working); its help text is the field's `help` metadata. One reader, `from_mapping`,
turns the flags given (text) and the tables of a sweep file (TOML values) into a config: each value checked and
converted to its field's type, its choices and words (`--eps auto`), an error naming the flag, or the file and key.
Each dataclass has one `validate()`, called by every entry point (the CLI, `train.setup`, sweeps), so a value is
checked in one place. The environment (DPO_HELLASWAG_DIR, DPO_TRAIN_FROM_VAL) is read in one place too,
`environment()`, when a DataConfig is made with those fields left unset.
"""

import argparse
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields

from dpo.core import dashboards, datasources, losses
from dpo.core.files import InputError, brief
from dpo.core.metrics import SCORINGS
from dpo.core.pairscores import DEFAULT_SCORE, MIN_CALIBRATION, SCORES
from dpo.core.truncation import DEFAULT_TRUNCATION, TRUNCATIONS

SEED_MAX = 2**32 - 1  # seeds are 0 .. 2**32 - 1 (numpy's range), for every command and sweep file
SEEDS = (0, SEED_MAX)
INTEGERS = (-2**63, 2**63 - 1)  # an integer setting beyond int64 is no setting (torch and numpy overflow on it)


def check_seed(value, name: str) -> int:
    """A seed in 0..SEED_MAX (the one range of every seed: --seed, a sweep's seeds and eval_seed), else InputError
    naming the setting."""
    return check_type(value, int, name, bounds=SEEDS)


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


ITEM_ORDERS = ("file", "shuffled")
FORMATS = ("mc", "completion")  # a pair's prompt: multiple choice with few-shot examples, or context -> ending
FEWSHOT_INDICES = (0, 4, 36, 13, 21, 41, 29, 26)  # the original study's few-shot items (train split)


@dataclass
class DataConfig:
    format: str = opt("mc", "pair format: 'mc' (the original study's multiple-choice prompt, answer ' 0'..' 3') "
                      "or 'completion' (context -> ending)", choices=FORMATS)
    n: int = opt(1000, "number of training pairs (taken from the start of the training pool)")
    noise: float = opt(0.0, "fraction of pairs whose chosen and rejected are swapped, in [0, 1]")
    seed: int = opt(1, f"seed of the few-shot draws, rejected endings and flips (a 'trial'; 0 to {SEED_MAX})",
                    bounds=SEEDS)
    fewshot: int = opt(1, "solved examples in each mc prompt, drawn per pair from the few-shot pool")
    grid: bool = opt(False, "write the original study's grid: noise 0, .25, .5, .75, 1 x seeds 1-5, N=1000")
    hellaswag_dir: str = opt(None, "folder with hellaswag_train.jsonl / hellaswag_val.jsonl; default: download into "
                             "--raw-dir (env DPO_HELLASWAG_DIR)")
    train_file: str = opt("", "local HellaSwag train JSONL (HellaSwag fields or {context, choices, answer})")
    val_file: str = opt("", "local HellaSwag validation JSONL")
    fewshot_file: str = opt("", "local JSONL of few-shot items (default: train items at --fewshot-indices)")
    train_from_val: bool = opt(None, "draw few-shot and training items from the validation items outside the "
                               "evaluation set (for a local copy without the train split). Not given: on when the "
                               "environment has DPO_TRAIN_FROM_VAL=1, unless --train-file is given (an explicit "
                               "train file wins); given together with --train-file, an error")
    fewshot_indices: str = opt(",".join(map(str, FEWSHOT_INDICES)),
                               "indices of the few-shot items in the train source")
    train_start: int = opt(50, "the training pool is the train source from this index on")
    item_order: str = opt("file", "order of the HellaSwag items before the splits are cut: 'file' (as the files list "
                          "them: the validation split's first ~3,240 items are ActivityNet's, the rest WikiHow's) or "
                          "'shuffled' (one fixed permutation of each file, the same for every seed and command, so "
                          "that every range of items mixes both sources)", choices=ITEM_ORDERS)
    seed_stride: int = opt(0, "each seed's training pool starts SEED_STRIDE x (seed - 1) items further into the "
                           "training source, so that seeds train on disjoint items while N <= SEED_STRIDE (0: every "
                           "seed draws its N items from the same start)")
    eval_start: int = opt(0, "first validation item of the evaluation set")
    eval_size: int = opt(1000, "number of validation items in the evaluation set")
    raw_dir: str = opt("data/raw", "where downloaded HellaSwag files go")
    out_dir: str = opt("data/dpo", "where preference files and the manifest go")
    pairs: str = opt("", "your own preference data instead of HellaSwag: a JSON list, JSONL, CSV or Parquet file, "
                     "a folder saved by `datasets` (save_to_disk, or a copy of a dataset repository), or a dataset "
                     "on the Hugging Face hub, OWNER/NAME[:CONFIG] (read with the datasets extra; a local path of "
                     "that name wins); rows "
                     "{prompt, chosen, rejected} as strings or as lists of {role, content} messages (docs/data.md: "
                     "Your own preference data). The HellaSwag flags are then unused; --n is the most training pairs "
                     "taken")
    pairs_split: str = opt("train", "with a hub dataset as --pairs: the split to read")
    pairs_revision: str = opt("", "with a hub dataset as --pairs: its revision (a branch, tag or commit; default: "
                              "the newest)")
    prompt_field: str = opt("prompt", "with --pairs: the column holding the prompt (a row without it: the prompt is "
                            "the start chosen and rejected share)")
    chosen_field: str = opt("chosen", "with --pairs: the column holding the preferred response")
    rejected_field: str = opt("rejected", "with --pairs: the column holding the other response")
    tokenizer: str = opt("", "with --pairs: the model whose chat template renders conversational rows (dpo train: "
                         "its --model)", aliases=("--model",))
    holdout: float = opt(0.1, "with --pairs: rows held out as validation pairs (<stem>_heldout_n<N>.json), drawn "
                         "before any flip and never flipped by dpo data, but as noisy as the source itself: a fraction "
                         "of the rows (below 1) or a number of rows (0: none)")
    noise_longer: float = opt(None, "with --pairs, the length noise model instead of --noise: the flip probability "
                              "of a pair whose chosen response is the longer one (in characters); needs "
                              "--noise-shorter")
    noise_shorter: float = opt(None, "the length noise model: the flip probability of a pair whose chosen response "
                               "is the shorter one or as long; needs --noise-longer")
    flip_prob_field: str = opt("", "with --pairs, the per-row noise model instead of --noise: each row's flip "
                               "probability is its value in this column (a number in [0, 1])")

    def __post_init__(self):
        env = environment()
        if self.hellaswag_dir is None:  # not given: the environment's local copy, else a download
            self.hellaswag_dir = env["hellaswag_dir"]
        if self.train_from_val is None:  # not given: the environment decides, unless a train file is given
            self.train_from_val = env["train_from_val"] and not self.train_file

    def fewshot_index_list(self) -> list:
        try:
            return [int(i) for i in self.fewshot_indices.split(",") if i.strip()]
        except ValueError:
            raise InputError(f"--fewshot-indices {self.fewshot_indices!r}: expected comma-separated integers") from None

    def validate(self) -> "DataConfig":
        _check(self.format in FORMATS, f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        _check(not (self.train_from_val and self.train_file), f"--train-file {self.train_file} and --train-from-val "
               "both say where the training items come from: give one")
        self.fewshot_index_list()
        check_seed(self.seed, f"--seed {self.seed}")
        _check(isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and 0 <= self.noise <= 1,
               f"--noise {self.noise} is outside [0, 1] (a fraction of pairs)")
        _check(self.n >= 1, f"--n {self.n}: expected at least 1 pair")
        _check(self.fewshot >= 0, f"--fewshot {self.fewshot}: expected 0 or more")
        _check(self.train_start >= 0 and self.eval_start >= 0, "--train-start and --eval-start must be >= 0")
        _check(self.eval_size >= 1, f"--eval-size {self.eval_size}: expected at least 1 item")
        _check(self.seed_stride >= 0, f"--seed-stride {self.seed_stride}: expected 0 (off) or a number of items")
        if self.seed_stride:
            _check(self.n <= self.seed_stride, f"--n {self.n} is more than --seed-stride {self.seed_stride}: seeds "
                   "would share training items; expected N <= SEED_STRIDE")
            _check(self.seed >= 1, f"--seed {self.seed} with --seed-stride: expected a seed of 1 or more (seed 1 "
                   "starts at the pool's first item)")
        datasources.check(self)
        return self

    def noise_model(self) -> str:
        """uniform (--noise), length (--noise-longer/--noise-shorter) or field (--flip-prob-field)."""
        if self.flip_prob_field:
            return "field"
        return "uniform" if self.noise_longer is None and self.noise_shorter is None else "length"

    @property
    def source(self) -> datasources.Source:
        """Where the pairs come from (dpo/core/datasources.py): your own data with --pairs, else HellaSwag."""
        return datasources.of(self)


def environment() -> dict:
    """What the environment sets of a DataConfig left unset: DPO_HELLASWAG_DIR, a local HellaSwag copy, and
    DPO_TRAIN_FROM_VAL=1, the training items drawn from the validation items outside the evaluation set (unless a
    train file is given: an explicit --train-file wins). Read when a DataConfig is made, never at import."""
    return {"hellaswag_dir": os.environ.get("DPO_HELLASWAG_DIR", ""),
            "train_from_val": os.environ.get("DPO_TRAIN_FROM_VAL", "") not in ("", "0")}


def check_truncation(mode: str) -> None:
    _check(mode in TRUNCATIONS, f"--truncation-mode {mode!r}: expected one of {', '.join(TRUNCATIONS)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def meta(f, key: str, default=None):
    """A field's metadata value; a callable is called (help and choices read from a registry at that moment, so a
    loss registered after import is listed too)."""
    value = f.metadata.get(key, default)
    return value() if callable(value) and key in ("help", "choices") else value


def shown_default(value) -> str:
    """A default as it is typed on the command line: true/false, auto for None, the text itself."""
    if isinstance(value, bool):
        return str(value).lower()
    return "auto" if value is None else str(value)


def help_of(f, default) -> str:
    """The field's help, with its choices and default appended unless the help already names them."""
    text, choices = meta(f, "help", ""), meta(f, "choices")
    if choices and "one of" not in text:
        text += f" (one of: {', '.join(choices)})"
    if "default:" not in text and default != "":
        text += f" (default: {shown_default(default)})"
    return argparse_text(text)


def argparse_text(text: str) -> str:
    """argparse %-formats help strings (for %(default)s): a literal '%' ("95% interval") must be written '%%'."""
    return text.replace("%", "%%")


# ------------------------------------------------------------------------------------------- the one reader

KINDS = {"int": int, "float": float, "str": str, "bool": bool}  # a field's type, also when annotated as a string
EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
TEXT_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
              "off": False, "auto": None}  # a boolean flag's values (auto: decide from the device)


def kind_of(f) -> type:
    """A field's type: int, float, str or bool."""
    return KINDS.get(f.type, f.type)


def named(key: str, value, where: str = "", text: bool = False) -> str:
    """A setting as an error names it: `--flag 'value'` on the command line (text), else `<where>key = 'value'`
    (where: the file and section, e.g. "experiments/noise.toml: [train] ")."""
    return f"--{key.replace('_', '-')} {value!r}" if text else f"{where}{key} = {brief(value)}"


def check_type(value, kind: type, name: str, text: bool = False, words=(), also: str = "", bounds=INTEGERS):
    """value as `kind` (an int is fine for a float), else an InputError "<name>: expected ...<also>". One of
    `words` (a number field's word values, --eps auto) is kept as it is. text: value is command-line text, parsed
    as the kind (a boolean: true/false/yes/no/on/off/1/0, or auto for None); else it must have the kind already
    (a TOML value: "3" is no integer). An integer must lie within bounds (low, high): int64's, or a field's own
    (`bounds` metadata: a seed's)."""
    if isinstance(value, str) and value in words:
        return value
    if text and isinstance(value, str) and kind is not str:
        try:
            value = TEXT_BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            expected = "true, false or auto" if kind is bool else EXPECTED[kind]
            if words:
                expected = f"a number or one of {', '.join(words)}"
            raise InputError(f"{name}: expected {expected}") from None
        if kind is bool:
            return value  # (None: auto)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str)}[kind]
    if not ok:
        raise InputError(f"{name}: expected {EXPECTED[kind]}{also}")
    if kind is int and not bounds[0] <= value <= bounds[1]:
        raise InputError(f"{name}: expected an integer from {bounds[0]} to {bounds[1]}")
    return float(value) if kind is float else value


def field_value(f, value, where: str = "", text: bool = False, check=None, also: str = ""):
    """One field's value, checked and converted (`check_type`), then check(key, value) if given (a caller's own
    rule, e.g. a sweep's refusal of control characters), then its choices (read from the registries now); a field
    with a `canonical` function gives a value's own name for an alias (--loss robust -> rdpo, TRL's name)."""
    name = named(f.name, value, where, text)
    value = check_type(value, kind_of(f), name, text, f.metadata.get("words", ()), also,
                       f.metadata.get("bounds", INTEGERS))
    if check:
        check(f.name, value)
    choices = meta(f, "choices")
    if choices and value not in choices:
        raise InputError(f"{name}: expected one of {', '.join(choices)}")
    canonical = f.metadata.get("canonical")  # another name for a value (an alias) -> the value's own name
    return canonical(value) if canonical else value


def from_mapping(cls, values: dict, where: str = "", text: bool = False, check=None):
    """A cls from `values` (field name -> value; the fields not in it keep their defaults), every value read by
    `field_value`: the one reader of the command line (text=True: the flags given) and of sweep files (TOML
    values; where names the file and section in errors)."""
    known = {f.name: f for f in fields(cls)}
    values = with_own_names(cls, values, where)
    for key in values:
        if key not in known:
            raise InputError(f"{where}unknown key {key!r}; expected one of: {', '.join(known)}")
    return cls(**{key: field_value(known[key], value, where, text, check) for key, value in values.items()})


def hf_names(cls) -> dict:
    """Hugging Face's name of a setting (TrainingArguments, TRL, peft) -> this project's, for the fields that mean
    the same thing under another name: eval_steps -> eval_every, ..."""
    return {hf: f.name for f in fields(cls) for hf in f.metadata.get("hf", ())}


def with_own_names(cls, values: dict, where: str = "") -> dict:
    """values with HF names translated (`hf_names`); a setting given under both names is an error."""
    out, given_as = {}, {}
    for key, value in values.items():
        own = hf_names(cls).get(key, key)
        if own in out:
            raise InputError(f"{where}{given_as[own]} and {key} are the same setting: give one")
        out[own], given_as[own] = value, key
    return out


def add_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per dataclass field; argparse keeps the text of the flags given (`from_args` reads them).
    Booleans take an optional value: `--x`, `--x true`, `--x false` (and `--x auto` where the default is None,
    'decide from the device')."""
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = help_of(f, default)
        names = ("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()),
                 *("--" + n.replace("_", "-") for n in f.metadata.get("hf", ())))
        if kind_of(f) is bool:
            parser.add_argument(*names, nargs="?", const=True, default=argparse.SUPPRESS, help=help_text)
        elif f.metadata.get("positional"):
            parser.add_argument(f.name, help=argparse_text(meta(f, "help", "")), metavar=f.name.upper())
        else:
            parser.add_argument(*names, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper())


def from_args(cls, args: argparse.Namespace):
    """A cls from the flags given on the command line (`from_mapping` of their text)."""
    return from_mapping(cls, {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)},
                        text=True)


def normalize_argv(argv):
    """`--learning_rate=3e-4` -> `--learning-rate=3e-4`: both spellings reach the same flag."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


EPS_WORDS = ("auto", "posterior")  # --eps values besides numbers
LABEL_FIXES = ("none", "relabel", "filter", "oracle-relabel", "oracle-filter")
AUDIT_SCORES = tuple(SCORES)


@dataclass
class EvalConfig:
    model: str = opt("", "model to score: hub id, HF folder, .gguf file, alias smollm2-135m, or a run directory "
                     "(default: the newest finished run under runs/, compared with its base model)")
    model_b: str = opt("", "a second model: both are scored on the same items and compared (paired bootstrap "
                       "CI, McNemar); its results go to its own default folder")
    limit: int = opt(0, "score only the first LIMIT items of the evaluation set (0: all)")
    split: str = opt("", "score only items of this split_type ('indomain' or 'zeroshot'; where the file has it)")
    metrics: str = opt("completion,mc", "which scorings to run: 'completion' (lm-evaluation-harness's acc and "
                       "acc_norm), 'mc' (mc_acc: the training prompt's answer ' 0'..' 3'), or both")
    batch_size: int = opt(16, "items per forward pass")
    max_length: int = opt(1024, "longest sequence in tokens; longer inputs are cut from the left")
    device: str = opt("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    bootstrap: int = opt(10000, "paired-bootstrap resamples for the confidence interval of a difference")
    out_dir: str = opt("", "where --model's results.json, predictions.jsonl and comparison.json go (default: "
                       "<run>/eval for a run directory, else runs/eval/<model spec as a file name>)")
    allow_partial: bool = opt(False, "score a run directory that has no final/ yet (still training): its newest "
                              "checkpoint, into <run>/eval/step_NNNNNN/ (default: such a run is refused)")

    def metric_names(self) -> list:
        return [m.strip() for m in self.metrics.split(",") if m.strip()]

    def validate(self) -> "EvalConfig":
        names = self.metric_names()
        _check(bool(names) and all(m in SCORINGS for m in names),
               f"--metrics {self.metrics!r}: expected a comma-separated subset of {', '.join(SCORINGS)}")
        _check(self.batch_size >= 1 and self.bootstrap >= 1, "--batch-size and --bootstrap must be >= 1")
        _check(self.max_length >= 2, "--max-length must be >= 2")
        _check(self.limit >= 0, f"--limit {self.limit}: expected 0 (all) or a positive number")
        return self


@dataclass
class TrainConfig:
    model: str = opt("gpt2-large", "policy and reference: hub id, HF folder, .gguf file or alias smollm2-135m")
    run_name: str = opt("", "run name (default: built from model, data file and loss)")
    output_dir: str = opt("", "where checkpoints, metrics and TensorBoard logs go (default: runs/<run_name>)")
    train_data_path: str = opt("", "training pairs JSON (default: the data/dpo file for the data flags, "
                               "created when missing)")
    val_data_path: str = opt("", "clean validation pairs JSON (default: the matching data/dpo val file)")
    val_size: int = opt(200, "evaluate on the first VAL_SIZE validation pairs (0: all)")
    loss: str = opt("sigmoid", lambda: "; ".join(f"{spec.name}: {spec.help}" for spec in losses.LOSSES.values())
                    + " (also TRL's names: " + ", ".join(f"{a} = {s.name}" for s in losses.LOSSES.values()
                                                        for a in s.aliases)
                    + "; docs/training.md: Losses in TRL and torchtune)", choices=losses.names,
                    canonical=lambda name: losses.get(name).name)
    beta: float = opt(0.1, "DPO temperature beta")
    eps: float = opt(0.1, lambda: "assumed label-flip rate of the losses that take one ("
                     + ", ".join(n for n, s in losses.LOSSES.items() if s.takes_eps) + "): a number, 'auto' (the "
                     "noise rate `dpo audit` estimates for the training file) or 'posterior' (per pair: its audit "
                     "flip posterior)", words=EPS_WORDS)
    label_fix: str = opt("none", "before training, correct the labels with the reference model's audit (dpo audit): "
                         "relabel (swap the pairs whose flip posterior exceeds --fix-threshold), filter (drop "
                         "them), or with the file's true `flipped` field: oracle-relabel, oracle-filter",
                         choices=LABEL_FIXES)
    fix_threshold: float = opt(0.5, "flip posterior above which --label-fix relabels or drops a pair")
    audit_score: str = opt(DEFAULT_SCORE, "the audit's pair score (see dpo audit --help)",
                           choices=AUDIT_SCORES)
    learning_rate: float = opt(5e-6, "peak AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    epochs: int = opt(1, "passes over the training pairs")
    max_steps: int = opt(0, "optimizer steps; overrides --epochs when > 0")
    per_device_train_batch_size: int = opt(0, "pairs per micro-batch (0: auto, 4 on the CPU; on CUDA the whole "
                                           "step, split further only if it does not fit in memory)")
    gradient_accumulation_steps: int = opt(0, "micro-batches per optimizer step (0: auto, so that a step has "
                                           "16 pairs); a step's update does not depend on how it is split")
    micro_batch_tokens: int = opt(0, "regroup each step's pairs into micro-batches of at most this many (padded) "
                                  "tokens instead of a fixed number of pairs (0: off)")
    warmup_steps: int = opt(10, "linear warmup steps")
    lr_scheduler_type: str = opt("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    max_length: int = opt(1024, "longest sequence in tokens (prompt + a response); a longer pair is cut as "
                          "--truncation-mode says")
    truncation_mode: str = opt(DEFAULT_TRUNCATION, lambda: "; ".join(f"{t.name}: {t.help}" for t in
                                                                     TRUNCATIONS.values())
                               + " (TRL's names; part of the reference cache key when not keep_end)",
                               choices=tuple(TRUNCATIONS))
    append_eos: bool = opt(False, "end each response (chosen and rejected) with the tokenizer's EOS token, as TRL's "
                           "DPOTrainer does (part of the reference cache key; default: the responses as written)")
    lora_r: int = opt(0, "train LoRA adapters of this rank beside the frozen model instead of every weight; the "
                      "reference is the same model with its adapters off (0: off, full fine-tuning)")
    lora_alpha: float = opt(16.0, "with --lora-r: the adapters' output is scaled by alpha / r (alpha kept fixed "
                            "when r changes, as the LoRA paper does)")
    lora_targets: str = opt("", "with --lora-r: comma-separated names of the linear layers to adapt, matched as "
                            "peft does (c_proj: every module named c_proj; attn.c_proj: those in an attn) (default: "
                            "every linear layer but the output embedding: GPT-2 c_attn,c_proj,c_fc; Llama/SmolLM2 "
                            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)", hf=("lora_target_modules",))
    lora_dropout: float = opt(0.0, "with --lora-r: dropout probability on the adapters' input while training, in "
                              "[0, 1) (the model's own dropout is off)")
    precision: str = opt("auto", "fp32, or bf16: forward and backward in a bf16 copy of the weights, fp32 master "
                         "weights, gradients and optimizer state; reference log-probs and validation stay fp32 "
                         "(auto: bf16 on CUDA and on CPUs with fast bf16 matrix products, else fp32)",
                         choices=("auto", "fp32", "bf16"))
    compile: bool = opt(None, "torch.compile the model's forward: true, false or auto (on with CUDA)")
    gradient_checkpointing: bool = opt(None, "recompute activations in the backward pass to save memory: true, "
                                       "false, or auto (off)")
    ref_on_the_fly: bool = opt(False, "run the frozen reference model every step instead of caching its "
                               "log-probs once before training")
    cache_dir: str = opt("data/cache", "where cached reference log-probs go")
    eval_every: int = opt(25, "evaluate on the validation pairs every K steps (0: only at the end)", hf=("eval_steps",))
    save_every: int = opt(50, "checkpoint every K steps (0: only at the end)", hf=("save_steps",))
    keep_checkpoints: int = opt(1, "how many of the newest checkpoints to keep (each holds the weights and the "
                                "optimizer state: ~3x the model's fp32 size)", hf=("save_total_limit",))
    report_to: str = opt("tensorboard", lambda: "where the scalars go besides metrics.jsonl (always written), as "
                         "TRL's report_to, under the same names: a comma-separated list of " + "; ".join(
                             f"{b.name}: {b.help}" for b in dashboards.BACKENDS.values())
                         + "; or none (wandb, mlflow and trackio are optional extras: pip install -e '.[wandb]')")
    save_final: bool = opt(True, "at the end, save the last checkpoint and final/ (false: only summary.json, for "
                           "speed measurements that need no weights)")
    resume: bool = opt(False, "continue from the newest checkpoint in the output folder")
    device: str = opt("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")

    def step_pairs(self) -> int:
        """Pairs per optimizer step: per-device batch x accumulation; a flag left at 0 (auto) makes it 16."""
        micro, accum = self.per_device_train_batch_size, self.gradient_accumulation_steps
        if micro and accum:
            return micro * accum
        return (micro or accum) * max(1, 16 // (micro or accum)) if micro or accum else 16

    def validate(self) -> "TrainConfig":
        numbers = {"--beta": self.beta, "--learning-rate": self.learning_rate, "--weight-decay": self.weight_decay,
                   "--max-grad-norm": self.max_grad_norm, "--fix-threshold": self.fix_threshold}
        if self.eps not in EPS_WORDS:
            numbers["--eps"] = self.eps
        for flag, value in numbers.items():
            _check(math.isfinite(value), f"{flag} {value}: expected a finite number")
        _check(self.beta > 0, f"--beta {self.beta}: expected > 0")
        _check(self.learning_rate >= 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0,
               "--learning-rate, --weight-decay and --max-grad-norm must be >= 0")
        _check(self.loss in losses.names(), f"--loss {self.loss!r}: expected one of {', '.join(losses.names())}")
        self.loss = losses.get(self.loss).name  # an alias (TRL's name) becomes the loss's own
        spec = losses.get(self.loss)
        if self.eps in EPS_WORDS:
            _check(spec.takes_eps, f"--eps {self.eps}: only the losses with a flip rate use it "
                   f"({', '.join(n for n, s in losses.LOSSES.items() if s.takes_eps)}), not --loss {self.loss}")
        elif spec.takes_eps:
            _check(not spec.eps_problem(self.eps), spec.eps_problem(self.eps))
        _check(self.label_fix in LABEL_FIXES,
               f"--label-fix {self.label_fix!r}: expected one of {', '.join(LABEL_FIXES)}")
        _check(0 < self.fix_threshold < 1, f"--fix-threshold {self.fix_threshold}: expected a probability in (0, 1)")
        _check(self.audit_score in AUDIT_SCORES, f"--audit-score {self.audit_score!r}: expected one of "
               f"{', '.join(AUDIT_SCORES)}")
        _check(self.per_device_train_batch_size >= 0 and self.gradient_accumulation_steps >= 0,
               "--per-device-train-batch-size and --gradient-accumulation-steps must be >= 1 (or 0: auto)")
        _check(self.micro_batch_tokens >= 0, "--micro-batch-tokens must be >= 0")
        _check(self.epochs >= 1 and self.max_steps >= 0, "--epochs must be >= 1 and --max-steps >= 0")
        _check(self.warmup_steps >= 0 and self.eval_every >= 0 and self.save_every >= 0 and self.val_size >= 0,
               "--warmup-steps, --eval-every, --save-every and --val-size must be >= 0")
        _check(self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
        _check(not dashboards.problem(self.report_to), dashboards.problem(self.report_to))
        _check(self.max_length >= 2, "--max-length must be >= 2")
        check_truncation(self.truncation_mode)
        _check(self.threads >= 0, "--threads must be >= 0")
        self.validate_lora()
        return self

    def validate_lora(self) -> None:
        """The --lora-* flags: a rank >= 0 (0: off), the others only with a rank; the targets as a clean
        comma-separated list of module names (whether the model has them is checked when it is loaded)."""
        _check(self.lora_r >= 0, f"--lora-r {self.lora_r}: expected a rank of 1 or more, or 0 (off: full "
               "fine-tuning)")
        if not self.lora_r:
            given = [flag for flag, on in (("--lora-alpha", self.lora_alpha != 16),
                                           ("--lora-targets", self.lora_targets),
                                           ("--lora-dropout", self.lora_dropout != 0)) if on]
            _check(not given, f"{', '.join(given)}: only with --lora-r (the adapters' rank, >= 1)")
            return
        _check(math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
               f"--lora-alpha {self.lora_alpha}: expected a number > 0")
        _check(math.isfinite(self.lora_dropout) and 0 <= self.lora_dropout < 1,
               f"--lora-dropout {self.lora_dropout}: expected a probability in [0, 1)")
        names = [t.strip() for t in self.lora_targets.split(",")]
        _check(self.lora_targets == "" or all(re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", t) for t in names),
               f"--lora-targets {self.lora_targets!r}: expected comma-separated module names (c_attn,attn.c_proj)")
        self.lora_targets = ",".join(dict.fromkeys(t for t in names if t))


@dataclass
class AuditConfig:
    pairs: str = opt("", "the preference file to audit: a JSON list or a JSONL file of {prompt, chosen, rejected} "
                     "(a `flipped` field, "
                     "where present, is the ground truth the audit is scored against)", positional=True)
    model: str = opt("gpt2-large", "the reference model: hub id, HF folder, .gguf file, alias smollm2-135m or a run "
                     "folder (the model `dpo train` would start from)")
    val_file: str = opt("", "clean pairs a person trusts, from the same distribution, that calibrate the detector "
                        "(default: the clean HellaSwag validation pairs `dpo data` wrote with PAIRS; for a file made "
                        "from your own --pairs, none: the estimate comes from PAIRS's own scores): at least "
                        f"{MIN_CALIBRATION} after --val-skip, none marked flipped, none also in PAIRS")
    held_out_is_clean: bool = opt(False, "for a file `dpo data --pairs` made: calibrate on its held-out rows "
                                  "(<stem>_heldout_n<N>.json) as if clean; they carry the source's own noise, so say "
                                  "so only when the source itself is clean")
    truth_field: str = opt("", "the field of PAIRS that holds the true flipped/not-flipped label, scored against "
                           "(default: `flipped` for HellaSwag files `dpo data` made; a --pairs file's `flipped` "
                           "is only the flips dpo data added)")
    review: int = opt(0, "write this many pairs, drawn uniformly at random (--review-seed), to review.csv and "
                      "review.jsonl in --out-dir for a person to judge (docs/audit.md: 'Reviewing pairs')")
    review_seed: int = opt(1, f"the seed of the --review draw (0 to {SEED_MAX})", bounds=SEEDS)
    reviewed: str = opt("", "a review.csv (or .jsonl) with a person's verdicts (column verdict: yes / no / unsure): "
                        "eps from them directly and combined with the scores; writes reviewed.json, the file with "
                        "the pairs marked 'no' swapped, which --label-fix never changes")
    val_skip: int = opt(0, "calibrate on the clean pairs from this index on (`dpo train` skips its --val-size "
                        "validation pairs, so no pair both calibrates a correction and measures its effect)")
    score: str = opt(DEFAULT_SCORE, "pair score: margin_per_char (the chosen-minus-rejected log-prob "
                     "margin, each divided by the response's length in characters, like acc_norm) or margin "
                     "(summed log-probs)", choices=AUDIT_SCORES)
    fix_threshold: float = opt(0.5, "a pair is flagged when its flip posterior exceeds this")
    out_dir: str = opt("", "where audit.json, audit.jsonl and the plots go (default: runs/audit/<file>-<model>)")
    max_length: int = opt(1024, "longest sequence in tokens, as in dpo train (part of the reference cache key)")
    append_eos: bool = opt(False, "end each response with the tokenizer's EOS token, as dpo train --append-eos (part "
                           "of the reference cache key)")
    truncation_mode: str = opt(DEFAULT_TRUNCATION, "how a pair longer than --max-length is cut, as dpo train "
                               "--truncation-mode (part of the reference cache key when not keep_end)",
                               choices=tuple(TRUNCATIONS))
    precision: str = opt("auto", "fp32 or bf16 (auto: fp32, the precision of dpo train's reference log-probs, "
                         "so the two share cache entries)",
                         choices=("auto", "fp32", "bf16"))
    device: str = opt("auto", "'auto' (cuda if available), 'cpu' or 'cuda'")
    cache_dir: str = opt("data/cache", "where cached reference log-probs go (shared with dpo train)")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")

    def validate(self) -> "AuditConfig":
        _check(bool(self.pairs), "expected a preference file to audit")
        _check(self.score in AUDIT_SCORES, f"--score {self.score!r}: expected one of {', '.join(AUDIT_SCORES)}")
        _check(0 < self.fix_threshold < 1, f"--fix-threshold {self.fix_threshold}: expected a probability in (0, 1)")
        _check(self.val_skip >= 0, "--val-skip must be >= 0")
        _check(self.review >= 0, "--review must be >= 0")
        _check(not (self.review and self.reviewed), "--review K draws pairs to review and --reviewed reads the "
               "verdicts back: give one of them")
        _check(self.max_length >= 2, "--max-length must be >= 2")
        check_truncation(self.truncation_mode)
        _check(self.threads >= 0, "--threads must be >= 0")
        return self
