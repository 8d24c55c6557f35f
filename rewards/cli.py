"""``rlplat reward CASES.jsonl --reward NAME [--plugin FILE_OR_MODULE] [--args key=value ...]``: score a JSONL
file, print per-case results. NAME is what a config's ``rewards.terms[].name`` takes (a registry name,
``package.module:function`` or ``path/to/file.py:function``); ``--plugin`` is ``rewards.plugins``.

Each line is a case: ``{"prompt", "response", "label", "metadata", "response_tokens", "id"}`` (other keys go to
metadata). Malformed lines, non-UTF-8 bytes and bad fields become error rows; they never stop the run.
Exit code: 0 when the file was scored (even with per-case errors), 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from rewards.api import RewardResult, Sample
from rewards.runner import RewardRunner, term_passes
from rlplat.reward_config import RewardsConfig, RewardSpec


def parse_kv(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is read as JSON when it parses (numbers, bools, objects), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--args expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def load_cases(path: Path) -> list[tuple[int, Sample | None, str | None, str]]:
    """(line number, sample or None, error or None, case id) for every non-blank line."""
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw.decode("utf-8"))
            sample = Sample.from_dict(d)
            rows.append((n, sample, None, str(sample.metadata.get("id", n))))
        except UnicodeDecodeError as e:
            rows.append((n, None, f"line is not UTF-8 (byte {e.start})", str(n)))
        except (ValueError, TypeError) as e:
            rows.append((n, None, f"{type(e).__name__}: {e}", str(n)))
    return rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    path = Path(args.cases)
    if not path.is_file():
        console.print(f"[red]no such file: {path}[/red]")
        return 2
    try:
        spec = RewardSpec(
            name=args.reward,
            args=parse_kv(args.args or []),
            timeout_s=args.timeout,
            fallback_score=args.fallback,
        )
        runner = RewardRunner(
            RewardsConfig(terms=[spec], max_concurrency=args.concurrency, plugins=args.plugin or [])
        )
    except (ValueError, TypeError, ImportError) as e:
        console.print(f"[red]cannot set up reward {args.reward!r}: {e}[/red]")
        if "rewards.plugins" in str(e):
            console.print("rlplat reward takes rewards.plugins as --plugin FILE_OR_MODULE")
        return 2
    rows = load_cases(path)
    if args.limit:
        rows = rows[: args.limit]
    samples = [s for _, s, _, _ in rows if s is not None]
    scored = iter(runner.score(samples))
    results: list[RewardResult] = []
    for _, sample, err, _ in rows:
        if sample is None:
            results.append(RewardResult(score=spec.fallback_score, verdict="bad_case", error=err))
        else:
            results.append(next(scored).components[spec.key])
    table = Table(title=f"{args.reward} on {path.name}", show_lines=False)
    for col in ("line", "id", "score", "verdict", "extracted", "error"):
        table.add_column(col, overflow="fold")
    for (line, _, _, cid), r in zip(rows, results):
        extracted = "" if r.extracted is None else r.extracted.replace("\n", "⏎")[:60]
        table.add_row(
            str(line), cid[:30], f"{r.score:.3f}", r.verdict or "", extracted, (r.error or "")[:120]
        )
    if not args.quiet:
        console.print(table)
    n = len(results)
    mean = sum(r.score for r in results) / n if n else 0.0
    failed = [r for r in results if r.error is not None]
    verdicts = Counter(r.verdict or "-" for r in results)
    correct = [term_passes(r, spec.correct_threshold) for r in results if spec.correct_threshold is not None]
    accuracy = f"  accuracy {sum(correct) / len(correct):.4f}" if correct else ""
    console.print(
        f"[bold]{n} cases[/bold]  mean score {mean:.4f}{accuracy}  errors {len(failed)}  "
        f"verdicts {dict(verdicts.most_common())}  metrics {_short(runner.metrics())}"
    )
    if failed:
        # Text, not markup: an error message may contain [brackets].
        console.print(Text.assemble(("first error: ", "red"), failed[0].error or ""))
    if args.json_out:
        with open(args.json_out, "w") as f:
            for (line, _, _, cid), r in zip(rows, results):
                f.write(
                    json.dumps(
                        {
                            "line": line,
                            "id": cid,
                            "score": r.score,
                            "verdict": r.verdict,
                            "extracted": r.extracted,
                            "error": r.error,
                            "info": r.info,
                        },
                        default=str,
                    )
                    + "\n"
                )
    return 0


def _short(m: dict[str, float]) -> dict[str, float]:
    return {
        k.split("/")[-1]: round(v, 4)
        for k, v in m.items()
        if k.endswith(("latency_mean_s", "timeouts", "errors"))
    }


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reward`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "reward", help="score a JSONL file of cases with one reward (debug a reward before a run)"
    )
    p.add_argument("cases", help="JSONL file: one {prompt, response, label, metadata} object per line")
    p.add_argument(
        "--reward",
        required=True,
        help="registry name (e.g. math, code, think_format, or one a --plugin registers), "
        "package.module:function, or path/to/file.py:function",
    )
    p.add_argument(
        "--plugin",
        action="append",
        metavar="FILE_OR_MODULE",
        help="import this .py file or module first, so its @reward names work with --reward (repeatable)",
    )
    p.add_argument(
        "--args", nargs="*", metavar="KEY=VALUE", help="reward arguments; values parsed as JSON when possible"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-call timeout in seconds (default 30)")
    p.add_argument(
        "--fallback", type=float, default=0.0, help="score recorded for a failed or timed-out call"
    )
    p.add_argument("--concurrency", type=int, default=4, help="reward calls in flight at once (default 4)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N cases")
    p.add_argument("--json-out", default=None, help="also write per-case results as JSONL here")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlplat")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
