"""Entry point of the `dalle-farm` console script: parse arguments and dispatch a subcommand.

Each subcommand is a module of this package, listed in `SUBCOMMANDS`, exposing::

    add_parser(subparsers) -> None   # adds its argparse sub-parser
    run(args) -> int                 # runs it and returns the exit code

Every listed module is imported to build the parser, whichever subcommand runs, so modules
must be cheap to import: torch and the model are imported inside `run`. That keeps this entry
point torch-free for processes that must not load torch (the API server).

A subcommand reports a user's mistake (bad input, missing weights, unwritable path) by raising
`CommandError`; `main` prints it as one line and exits with status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

PROG = "dalle-farm"
SUBCOMMANDS = (
    "cli.generate",
    "cli.api",
    "cli.worker",
    "cli.serve",
    "cli.keys",
    "cli.bulk",
    "cli.weights",
)

EXIT_ERROR = 1
# Exit status of a process stopped by Ctrl-C, by the shell's 128 + SIGINT convention.
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure that is not a bug: shown as ``dalle-farm: error: <message>``, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser, with one sub-parser per module in `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="DALL·E Mini/Mega text-to-image, and a render farm around it.",
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        known = set(subparsers.choices)
        module.add_parser(subparsers)
        # Tie the sub-parsers the module just added to its run(), so dispatch needs no second
        # table of command names that could drift from the ones the module registered.
        for name in subparsers.choices.keys() - known:
            subparsers.choices[name].set_defaults(run=module.run)
    return parser


def one_line(message: object) -> str:
    """Join a possibly multi-line message into one line (model errors put advice on line 2)."""
    lines = (line.strip() for line in str(message).splitlines())
    return " ".join(line for line in lines if line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dalle-farm`` with ``argv`` (default: the process arguments); return the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CommandError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Ctrl-C is the normal way to stop a long generation; a traceback would be noise.
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`dalle-farm keys list | head -1`): nothing more to say, to anyone.
        # Point stdout at nothing, so that flushing it at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
