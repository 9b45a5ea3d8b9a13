"""`python -m idefics3.finetune {finetune,merge} ...`: the fine-tuning subcommands without the main CLI."""

from __future__ import annotations

import argparse
import sys

from .cli import add_finetune_parser, add_merge_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics3.finetune")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(subparsers)
    add_merge_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
