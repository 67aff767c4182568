"""``lorafast`` command line: one sub-command per user-facing job.

Each sub-command lives in its own module, which exposes ``register(subparsers)``: it adds its
parser and sets ``func`` to the function that runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# Modules that each register one or more sub-commands, in the order `lorafast --help` lists them.
COMMAND_MODULES: list[str] = ["lorafast.finetune", "lorafast.demo", "lorafast.bench_cli", "lorafast.export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafast", description="Fused Triton LoRA: train, benchmark, merge.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: staged outputs are removed on the way out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as error:  # OSError: paths (a file where a folder goes, read-only, full disk)
        print(f"lorafast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorafast {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
