"""Where preference pairs come from: one entry per source kind, in one table, like the losses.

A DataConfig's settings name its source (`--pairs` given: your own preference data; otherwise HellaSwag), and
`DataConfig.source` is its entry here. An entry declares what the rest of the code would otherwise branch on:
- the settings only it takes (given with another source: one error naming them) and the checks of its settings;
- its validation pairs: the setting that sizes them, how many the settings make (when known without reading the
  source), and whether every cell of a sweep is measured on the pairs drawn with eval_seed (HellaSwag) or on the
  source's own held-out rows, which no seed changes (your pairs);
- whether conversations are rendered with a model's chat template (then `--tokenizer` defaults to the model trained);
- whether the training pairs are HellaSwag items (then a sweep checks that no scored item is a training item);
- the words a study report uses for it.

Reading a source and writing its pair files is data's job: `dpo/data/prepare.py` has one plan per entry (`PLANS`,
keyed by these names). Adding a source kind is an entry here and a plan there.
"""

import math
from dataclasses import dataclass
from typing import Callable

from dpo.core.files import InputError

# the DataConfig fields of --pairs (commands that make no pairs leave them out)
PAIRS_FIELDS = ("pairs", "pairs_split", "pairs_revision", "prompt_field", "chosen_field", "rejected_field",
                "tokenizer", "holdout", "noise_longer", "noise_shorter", "flip_prob_field")


@dataclass(frozen=True)
class Source:
    name: str
    selected: Callable  # cfg -> bool: the settings choose this source
    needs: str  # how a user chooses it (named in the error for a setting given without it)
    own: tuple  # (flag, cfg -> bool: given) of the settings only this source takes
    check: Callable  # cfg -> None: its settings' checks (InputError)
    validation: str  # the setting that sizes its validation pairs
    validation_values: str  # what that setting takes (named in the error when it makes none)
    validation_count: Callable  # cfg -> int, or None when it depends on the source's size
    shared_validation: bool  # a sweep measures every cell on eval_seed's validation pairs (else the source's own)
    renders_chat: bool  # conversations rendered with a chat template (--tokenizer, default the model trained)
    hellaswag_items: bool  # its training pairs are HellaSwag items (a scored item must not be one)
    origin: Callable  # cfg -> str: how the report says the pairs were made
    held_out: Callable  # (cfg, eval_seed) -> str: how the report says where the validation pairs come from
    rows: str  # what a seed samples from: the report's word
    redrawn: str  # what a seed redraws when every seed trains on the same rows


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def _fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_hellaswag(cfg) -> None:
    """HellaSwag's own settings are checked with the common ones (DataConfig.validate)."""


def check_pairs(cfg) -> None:
    """The --pairs settings: column names, the holdout, one noise model with probabilities in [0, 1]."""
    _require(not cfg.seed_stride, "--seed-stride slices HellaSwag's training pool; with --pairs each seed already "
             "draws its own sample of the file")
    _require(bool(cfg.pairs_split), "--pairs-split: expected a split's name (train, test, ...)")
    names = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    _require(all(isinstance(n, str) and n for n in names) and len(set(names)) == 3,
             f"--prompt-field, --chosen-field, --rejected-field {names}: expected three different column names")
    _require(_fraction(cfg.holdout) and cfg.holdout >= 0 and (cfg.holdout < 1 or cfg.holdout == int(cfg.holdout)),
             f"--holdout {cfg.holdout}: expected a fraction of the rows (0 to below 1) or a whole number of rows")
    model = cfg.noise_model()
    if model == "length":
        for flag, p in (("--noise-longer", cfg.noise_longer), ("--noise-shorter", cfg.noise_shorter)):
            _require(p is not None, "--noise-longer and --noise-shorter go together (the length noise model: the flip "
                     "probability when chosen is the longer response, and otherwise)")
            _require(_fraction(p) and 0 <= p <= 1, f"{flag} {p} is outside [0, 1] (a flip probability)")
    models = [name for name, on in (("--noise", cfg.noise != 0),
                                    ("--noise-longer/--noise-shorter",
                                     model == "length" or cfg.noise_longer is not None),
                                    ("--flip-prob-field", bool(cfg.flip_prob_field))) if on]
    _require(len(models) <= 1, f"{' and '.join(models)}: two noise models, give one")
    _require(not (cfg.grid and model != "uniform"), "--grid varies --noise: not with the length or per-row model")


HELLASWAG = Source(
    name="hellaswag",
    selected=lambda cfg: not cfg.pairs,
    needs="HellaSwag (no --pairs)",
    own=(),
    check=check_hellaswag,
    validation="eval_size",
    validation_values="a number of items",
    validation_count=lambda cfg: cfg.eval_size,
    shared_validation=True,
    renders_chat=False,
    hellaswag_items=True,
    origin=lambda cfg: f"{cfg.format} format, {cfg.fewshot} few-shot example(s) per prompt",
    held_out=lambda cfg, eval_seed: f"drawn with seed {eval_seed} for every cell",
    rows="items",
    redrawn="the flips, the rejected endings and the order",
)

PAIRS = Source(
    name="pairs",
    selected=lambda cfg: bool(cfg.pairs),
    needs="--pairs (your own preference data); HellaSwag pairs take --noise",
    own=(("--noise-longer/--noise-shorter", lambda cfg: cfg.noise_model() == "length"),
         ("--flip-prob-field", lambda cfg: cfg.noise_model() == "field"),
         ("--tokenizer/--model", lambda cfg: bool(cfg.tokenizer)),
         ("--pairs-split", lambda cfg: cfg.pairs_split != "train"),
         ("--pairs-revision", lambda cfg: bool(cfg.pairs_revision)),
         ("--prompt-field", lambda cfg: cfg.prompt_field != "prompt"),
         ("--chosen-field", lambda cfg: cfg.chosen_field != "chosen"),
         ("--rejected-field", lambda cfg: cfg.rejected_field != "rejected")),
    check=check_pairs,
    validation="holdout",
    validation_values="a fraction of the rows below 1, or a number of rows; default 0.1",
    validation_count=lambda cfg: int(cfg.holdout) if cfg.holdout >= 1 or cfg.holdout == 0 else None,
    shared_validation=False,
    renders_chat=True,
    hellaswag_items=False,
    origin=lambda cfg: f"from `{cfg.pairs}`",
    held_out=lambda cfg, eval_seed: f"of the file's held-out rows (holdout {cfg.holdout:g}), the same for every "
                                    "cell, chosen before any flip",
    rows="rows of the file",
    redrawn="the flips and the order",
)

SOURCES = {source.name: source for source in (PAIRS, HELLASWAG)}  # the first one a config selects is its source


def of(cfg) -> Source:
    """The source a DataConfig's settings choose."""
    return next(source for source in SOURCES.values() if source.selected(cfg))


def check(cfg) -> None:
    """The settings of other sources are not given, and the chosen source's own settings are sound."""
    source = of(cfg)
    for other in SOURCES.values():
        if other is not source:
            given = [flag for flag, on in other.own if on(cfg)]
            _require(not given, f"{', '.join(given)}: only with {other.needs}")
    source.check(cfg)
