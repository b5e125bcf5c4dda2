"""`ciphertwin` command line: one entry point, each package registers its sub-commands.

Every package that offers commands has a `cli.py` with `register(subparsers)`; a sub-command
sets `func(args)` (sync, or async — then it is run with `asyncio.run`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Sequence

from ciphertwin.errors import CipherTwinError
from ciphertwin.log import configure_logging

# Packages whose `cli.register` adds sub-commands, in the order shown by --help.
COMMAND_MODULES = (
    "ciphertwin.broker.cli",
    "ciphertwin.cloud_twin.cli",
    "ciphertwin.agents.cli",
    "ciphertwin.agents.processing_cli",
    "ciphertwin.agents.operator_cli",
    "ciphertwin.mpc_nodes.cli",
    "ciphertwin.demo.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ciphertwin", description="MQTT platform for encrypted digital twins"
    )
    parser.add_argument("--log-json", action="store_true", help="log JSON lines (for machines)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # this package offers no commands (yet)
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        result = args.func(args)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
    except CipherTwinError as exc:
        print(f"ciphertwin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
