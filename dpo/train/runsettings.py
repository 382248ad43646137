"""What defines a training run, and whether a run folder's training may be continued or reused with the settings
given now.

A run's numbers depend on its *defining* settings: the weights and tokenizer, the training and validation pairs
(sha256, of the file the label fix starts from), the loss and its parameters, the label fix, the optimizer and
schedule, the steps, the pairs per step, the max length, --append-eos, --truncation-mode, the precision, the
validation size, the seed and the LoRA settings (rank, alpha, targets, dropout). Every checkpoint records them (its
checkpoint.json), and `dpo train --resume` refuses a checkpoint recorded with others: one `error:` line lists the
differences. The *other* settings say only where and how the work is done (how often to validate and save, threads,
device, compilation, how a step is split into micro-batches, a cached or a live reference, the dashboards): they may
change, and a resume says which did in one `note:` line.

A sweep compares a cell's settings with the config.json of its run the same way (`record_changes`): field by field,
a field missing from an older record counting as its default, so fields added by later versions (with defaults
that do not change the numbers) never make a finished cell look as if it had been run with other settings.
"""

import json
from dataclasses import MISSING, fields

from dpo.core import losses, models
from dpo.core.config import EPS_WORDS, DataConfig, TrainConfig, check_type, kind_of
from dpo.core.datasources import PAIRS_FIELDS
from dpo.core.files import InputError, sha256_file
from dpo.engine import refcache
from dpo.engine.precision import resolve_precision

# TrainConfig fields the numbers depend on (`defining` also records the data, the weights' id and the resolved
# precision; the pairs per step come from the two batch flags, whose split of a step does not change its update)
TRAIN_FIELDS = ("model", "loss", "beta", "eps", "label_fix", "fix_threshold", "audit_score", "learning_rate",
                "weight_decay", "max_grad_norm", "epochs", "max_steps", "warmup_steps", "lr_scheduler_type",
                "max_length", "append_eos", "truncation_mode", "precision", "val_size", "lora_r", "lora_alpha",
                "lora_targets", "lora_dropout")
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_targets", "lora_dropout")  # recorded for LoRA runs only
# TrainConfig fields that cannot change them
OTHER_FIELDS = ("eval_every", "save_every", "keep_checkpoints", "report_to", "save_final", "threads", "device",
                "compile",
                "gradient_checkpointing", "ref_on_the_fly", "per_device_train_batch_size",
                "gradient_accumulation_steps", "micro_batch_tokens", "cache_dir")
# DataConfig fields the pairs made by the data flags depend on (besides the source files; paths are not compared)
DATA_FIELDS = ("format", "n", "noise", "seed", "fewshot", "fewshot_indices", "train_from_val", "train_start",
               "eval_start", "eval_size") + tuple(k for k in PAIRS_FIELDS if k != "tokenizer")
FIXES_WITH_AUDIT = ("relabel", "filter")
# defining settings added later, with the value every run of an earlier version had (its checkpoints lack them)
ADDED_LATER = {"append_eos": False, "truncation_mode": "keep_end"}


def train_values(cfg: TrainConfig) -> dict:
    """TRAIN_FIELDS of cfg and its pairs per step; a setting the run does not use is None (the eps of a loss that
    takes none, the epochs under --max-steps, the audit's settings without an audit), and a full fine-tuning run
    has no LoRA keys (so checkpoints and results recorded before LoRA existed compare equal)."""
    values = {k: getattr(cfg, k) for k in TRAIN_FIELDS}
    values["step_pairs"] = cfg.step_pairs()
    try:
        spec = losses.get(cfg.loss)
        values["loss"], takes_eps = spec.name, spec.takes_eps  # an alias (robust) is the loss it names (rdpo)
    except ValueError:  # a loss this version does not know (an old record): compare what is there
        takes_eps = True
    if not takes_eps:
        values["eps"] = None
    if cfg.max_steps:
        values["epochs"] = None
    if cfg.label_fix not in FIXES_WITH_AUDIT:
        values["fix_threshold"] = None
    if cfg.label_fix not in FIXES_WITH_AUDIT and cfg.eps not in EPS_WORDS:
        values["audit_score"] = None
    if not cfg.lora_r:  # full fine-tuning: no LoRA keys, as runs recorded them before LoRA existed
        for key in LORA_FIELDS:
            del values[key]
    return values


def defining(cfg: TrainConfig, seed: int, model_id: str, tokenizer: str, train_sha256: str, val_sha256,
             precision: str) -> dict:
    """The settings a run's numbers depend on, as checkpoint.json records them."""
    return {**train_values(cfg), "model": model_id, "tokenizer": tokenizer, "train_data": train_sha256,
            "val_data": val_sha256, "precision": precision, "seed": seed}


def other(cfg: TrainConfig, processes: int) -> dict:
    return {**{k: getattr(cfg, k) for k in OTHER_FIELDS}, "processes": processes}


def of_run(cfg: TrainConfig, seed: int, tokenizer, train_path, val_path, device, processes: int) -> dict:
    """What each checkpoint of a run records of its settings: those that define its numbers (the weights' id, the
    tokenizer and the precision as the reference cache keys them), and the others."""
    key = refcache.cache_key(models.model_id(cfg.model), tokenizer, cfg.max_length,
                             resolve_precision(cfg.precision, device), device.type, cfg.append_eos,
                             cfg.truncation_mode)
    return {"defining": defining(cfg, seed, key["model"], key["tokenizer"], sha256_file(train_path),
                                 sha256_file(val_path) if val_path else None, key["precision"]),
            "other": other(cfg, processes)}


def shown(value) -> str:
    """A setting in a message: a sha256 shortened, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return str(value)


def differences(old: dict, new: dict) -> list:
    """'key old -> new' for every key whose values differ (as JSON: numbers compare by value)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    keys = list(new) + [k for k in old if k not in new]
    return [f"{k} {shown(old.get(k))} -> {shown(new.get(k))}" for k in keys if old.get(k) != new.get(k)]


def check_checkpoint(checkpoint, recorded, now: dict, out_dir) -> str:
    """Raise InputError when the checkpoint's recorded settings differ from now's defining ones, or it recorded
    none (an older version's checkpoint); else '' or the note naming the other settings that changed."""
    if not (isinstance(recorded, dict) and isinstance(recorded.get("defining"), dict)
            and isinstance(recorded.get("other"), dict)):
        raise InputError(f"{checkpoint}: this checkpoint does not record the settings of its run (an older version "
                         "wrote it), so a resume cannot be checked to continue the same run; refusing to resume "
                         "from it: start a new run (another --run-name)")
    changed = differences({**ADDED_LATER, **recorded["defining"]}, now["defining"])
    if changed:
        raise InputError(f"{out_dir} was trained with other settings: {', '.join(changed)}; start a new run "
                         "(another --run-name) or resume with the same settings")
    changed = differences(recorded["other"], now["other"])
    return f"note: resuming {out_dir} with other settings that do not change its numbers: {', '.join(changed)}" \
        if changed else ""


def from_record(cls, record):
    """An instance of cls from a recorded asdict(): fields the record lacks (added later) are their defaults,
    unknown keys are ignored."""
    record = record if isinstance(record, dict) else {}
    values = {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        values[f.name] = record.get(f.name, default)
    return cls(**values)


def damaged_fields(cls, record) -> list:
    """The fields a recorded asdict() holds with a value of another type than the field's (the record was damaged
    or edited: its settings are unknown)."""
    record = record if isinstance(record, dict) else {}
    bad = []
    for f in fields(cls):
        if record.get(f.name) is not None:
            try:
                check_type(record[f.name], kind_of(f), f.name, words=f.metadata.get("words", ()))
            except InputError:
                bad.append(f.name)
    return bad


def record_changes(record: dict, data: DataConfig, train: TrainConfig) -> list:
    """How the settings (data, train) differ from those a run or result recorded ({"data": asdict, "train": asdict}),
    where the numbers can differ: ['train.max_steps 2 -> 3', ...]. A field the record lacks counts as its default;
    one of another type (a damaged record) counts as changed."""
    damaged = [f"{section}.{name}" for section, cls in (("data", DataConfig), ("train", TrainConfig))
               for name in damaged_fields(cls, record.get(section))]
    if damaged:
        return [f"{damaged[0]} unreadable (a value of another type: a damaged record)"]
    old_data, old_train = from_record(DataConfig, record.get("data")), from_record(TrainConfig, record.get("train"))
    changes = [f"data.{c}" for c in differences({k: getattr(old_data, k) for k in DATA_FIELDS},
                                                {k: getattr(data, k) for k in DATA_FIELDS})]
    return changes + [f"train.{c}" for c in differences(train_values(old_train), train_values(train))]
