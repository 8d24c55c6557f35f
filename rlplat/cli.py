"""The ``rlplat`` command line. Each subcommand lives with what it drives and registers itself here."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console


def _config_show(args: argparse.Namespace) -> int:
    from rlplat.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _register_config(sub) -> None:
    p = sub.add_parser("config", help="inspect experiment configs")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved, validated config")
    show.add_argument("config", help="YAML experiment file")
    show.add_argument("overrides", nargs="*", help="key.path=value overrides")
    show.set_defaults(func=_config_show)


def build_parser() -> argparse.ArgumentParser:
    from rewards.cli import register as register_reward
    from rlplat.bench import register as register_bench
    from rlplat.dashboard import register as register_dashboard
    from rlplat.engine.cli import register as register_engine
    from rlplat.run import register as register_run
    from rlplat.train.cli import register as register_merge

    parser = argparse.ArgumentParser(prog="rlplat", description="RL post-training for hybrid MoE models")
    sub = parser.add_subparsers(dest="command", required=True)
    register_run(sub)
    _register_config(sub)
    register_bench(sub)
    register_reward(sub)
    register_engine(sub)
    register_dashboard(sub)
    register_merge(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option after it, so in "CONFIG --flag a=1" the
    # override comes back unparsed: it belongs to the overrides, wherever the user put the flag
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad user input: one clear message, no traceback
        console = Console(stderr=True)
        console.print("error:", style="bold red", end=" ")
        console.print(str(err), markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (e.g. while Ray starts): no traceback
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
