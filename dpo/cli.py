"""The `dpo` command: `dpo data | train | eval`, each `--help` lists every flag."""

import argparse
import sys

from dpo.config import DataConfig, EvalConfig, TrainConfig, add_args, from_args, normalize_argv
from dpo.files import InputError, TrainingDiverged


def cmd_data(args):
    from dpo import data

    data.run(from_args(DataConfig, args))


def cmd_train(args):
    from dpo import train

    train.train(from_args(DataConfig, args), from_args(TrainConfig, args))


def cmd_eval(args):
    from dpo import score

    score.run(from_args(EvalConfig, args), from_args(DataConfig, args))


# name -> (function, help, [(config class, fields left out of this command's flags)])
COMMANDS = {
    "data": (cmd_data, "HellaSwag -> preference pairs with a controlled fraction of flipped labels",
             [(DataConfig, ())]),
    "train": (cmd_train, "DPO fine-tuning against a frozen reference (the data flags pick or create the "
              "training file)", [(DataConfig, ("grid", "out_dir")), (TrainConfig, ())]),
    "eval": (cmd_eval, "HellaSwag accuracy: lm-evaluation-harness's completion scoring (acc, acc_norm) and the "
             "training prompt's answer (mc_acc); two models side by side with paired statistics",
             [(DataConfig, ("n", "noise", "grid", "format", "out_dir")), (EvalConfig, ())]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="DPO under preference-label noise, on HellaSwag. "
                                     "Flags accept --with-dashes or --with_underscores.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, configs) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls, skip in configs:
            add_args(p, cls, skip)
        p.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
