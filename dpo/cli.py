"""The `dpo` command: `dpo data | train | eval`, each `--help` lists every flag."""

import argparse
import sys

from dpo.config import DataConfig, add_args, from_args, normalize_argv
from dpo.files import InputError


def cmd_data(args):
    from dpo import data

    data.run(from_args(DataConfig, args))


COMMANDS = {
    "data": (cmd_data, "HellaSwag -> preference pairs with a controlled fraction of flipped labels",
             [DataConfig]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo", description="DPO under preference-label noise, on HellaSwag. "
                                     "Flags accept --with-dashes or --with_underscores.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text, configs) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls in configs:
            add_args(p, cls)
        p.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
