"""The ``fakequant`` command. Each subcommand lives in its own module, which provides ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> registers one or more subcommands
SUBCOMMAND_MODULES = ("fakequant.report", "fakequant.compare_loss", "fakequant.analyze", "fakequant.demo_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fakequant", description="Training-time fake quantization tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fakequant {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
