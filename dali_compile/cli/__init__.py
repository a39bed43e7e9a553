"""The command line: `python -m dali_compile <command>` or `dali-compile <command>`.

    dali-compile run --model PATH --prompt "To be"        # stream tokens, then one summary line
    dali-compile run --model PATH --chat                   # one turn per line of stdin
    dali-compile bench --model PATH --policies dali all_cpu --prompt-lengths 16 128 --batch-sizes 1 4

Exit status: 0 done; 2 a mistake in the flags or inputs (one line on stderr, `error: ...`); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, run
from .options import CliError, Parser


def build_parser() -> Parser:
    parser = Parser(prog="dali-compile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    run.register(subparsers)
    bench.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "command"):
            parser.print_help(sys.stderr)
            return 2
        return args.command(args)
    except CliError as error:
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
