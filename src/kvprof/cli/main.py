"""The ``kvprof`` command: one module per subcommand, errors mapped to exit codes here.

Exit codes: 0 success; 2 bad arguments or a bad input file (one line on stderr,
never a traceback); 3 an unsupported vLLM; 1 any other kvprof error; 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys

from kvprof import __version__
from kvprof.errors import KvprofError, UsageError

COMMANDS = ("kvprof.cli.run:RunCommand", "kvprof.cli.info:InfoCommand", "kvprof.cli.analyze:AnalyzeCommand",
            "kvprof.cli.sweep:SweepCommand", "kvprof.cli.curve:CurveCommand",
            "kvprof.cli.predict:PredictCommand", "kvprof.cli.compare:CompareCommand",
            "kvprof.cli.export:ExportCommand", "kvprof.cli.merge:MergeCommand")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _load(spec: str):
    import importlib
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)()


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="kvprof", description="Profile the internals of a vLLM engine: "
                     "record per-step traces, then analyse them.")
    parser.add_argument("--version", action="version", version=f"kvprof {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = {}
    for spec in COMMANDS:
        command = _load(spec)
        commands[command.name] = command
        command.add_arguments(sub.add_parser(command.name, help=command.help,
                                             description=command.__doc__))
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    try:
        parser, commands = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return commands[args.command].run(args) or 0
    except KvprofError as exc:
        print(f"kvprof: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kvprof: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
