"""The ``ramserve`` command: parses arguments, calls the stage modules, prints. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RamserveError

Handler = Callable[[argparse.Namespace], int]


def _emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=1) if as_json else render(data))


def cmd_inspect(a: argparse.Namespace) -> int:
    from .source import describe, open_source, render_description

    _emit(describe(open_source(a.model)), a.json, render_description)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ramserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe a model without loading it")
    s.add_argument("model", help="local folder or Hugging Face repo id (org/name[@revision])")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except RamserveError as e:
        print(f"ramserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ramserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
