"""The `qwen3vl` command line: one subcommand per file."""

from __future__ import annotations

import argparse
import os
import sys

from runtime.errors import Qwen3VLError

from . import bench, build, chat, compare, plan, run, serve, synth

SUBCOMMANDS = (synth, build, run, chat, bench, plan, compare, serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3vl", description="Qwen3-VL on modest hardware.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except Qwen3VLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory (try a smaller --max-pixels, a shorter prompt or a smaller model)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`qwen3vl run ... | head -c1`): stop quietly, as command-line tools do.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # disk full, permission denied, ... on the user's files
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
