"""Run the benchmarks: ``python -m bench.run [--quick] [--only PART,...] [--publish]``.

Prints the summary table, and writes to ``results/<UTC time>/`` (``results/latest``
points at it): ``summary.json`` with every figure and sample, one JSON per part,
the plots (``timeline.png``, ``server-latency.png``) and the lab logs. ``--publish``
also rewrites the table and machine in ``docs/benchmarks.md`` and copies the
timeline plot next to it. Needs root (network namespaces, wireguard-go).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.common import REPO, Machine, Options, PartResult, Row, log, write_json
from wg_autopeer.lab import lab_unavailable_reason

# Run order: the CPU-heavy server part first, the lab parts after it.
PARTS = (
    "server_scale",
    "shared_registry",
    "convergence",
    "fallback",
    "pathswitch",
    "footprint",
    "gain",
    "timeline",
)
DOC = REPO / "docs" / "benchmarks.md"
DOC_PLOT = REPO / "docs" / "benchmarks-timeline.png"
TABLE_START = "<!-- bench:summary:start -->"
TABLE_END = "<!-- bench:summary:end -->"


def run_part(name: str, options: Options) -> PartResult:
    module = importlib.import_module(f"bench.{name}")
    started = time.monotonic()
    log(f"== {name}")
    try:
        result: PartResult = module.run(options)
    except Exception as exc:
        traceback.print_exc()
        result = PartResult(name, error=f"{type(exc).__name__}: {exc}")
        result.rows = [Row(name, "FAILED", result.error or "")]
    result.seconds = time.monotonic() - started
    log(f"== {name} done in {result.seconds:.0f} s")
    return result


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| part | measure | result | target |", "| --- | --- | --- | --- |"]
    for row in rows:
        target = f"{row.target} — **{row.verdict}**" if row.target else ""
        cells = (row.part, row.metric, row.result, target)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[Row]) -> str:
    width = max((len(r.metric) for r in rows), default=10)
    out = []
    part = ""
    for row in rows:
        if row.part != part:
            part = row.part
            out.append(f"\n{part}")
        verdict = f"  [{row.target}: {row.verdict}]" if row.target else ""
        out.append(f"  {row.metric:<{width}}  {row.result}{verdict}")
    return "\n".join(out)


def machine_line(machine: Machine) -> str:
    return (
        f"{machine.nproc} CPUs ({machine.cpu_model}), Linux {machine.kernel}, "
        f"Python {machine.python}; load average {machine.loadavg_1m:.2f} at the start; "
        f"commit {machine.commit}"
    )


def splice(text: str, block: str) -> str:
    """``text`` with its summary block (markers included) replaced by ``block``."""
    head, found, rest = text.partition(TABLE_START)
    _, found_end, tail = rest.partition(TABLE_END)
    if not found or not found_end:
        raise ValueError(f"no {TABLE_START} ... {TABLE_END} block to replace")
    return head + block + tail


def publish(rows: Sequence[Row], machine: Machine, options: Options, when: str) -> None:
    """Replace the summary block of docs/benchmarks.md; copy the timeline plot."""
    command = "sudo .venv/bin/python -m bench.run" + (" --quick" if options.quick else "")
    block = "\n".join(
        [
            TABLE_START,
            f"Run {when} with `{command}` on {machine_line(machine)}.",
            "",
            markdown_table(rows),
            TABLE_END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    DOC.write_text(splice(text, block))
    plot = options.out / "timeline.png"
    if plot.exists():
        shutil.copyfile(plot, DOC_PLOT)
    log(f"published {DOC.relative_to(REPO)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter windows")
    parser.add_argument("--only", metavar="PART,...", help=f"a subset of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, help="results folder (default results/<time>)")
    parser.add_argument(
        "--publish", action="store_true", help="update docs/benchmarks.md and its plot"
    )
    args = parser.parse_args(argv)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    reason = lab_unavailable_reason()
    if reason:
        print(f"bench: {reason}", file=sys.stderr)
        return 2
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = args.out or REPO / "results" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    options = Options(out=out, quick=args.quick)
    machine = Machine.here()
    log(f"results in {out}; {machine_line(machine)}")
    results = [run_part(name, options) for name in parts]
    rows = [row for result in results for row in result.rows]
    for result in results:
        write_json(out / f"{result.name.lower().replace(' ', '_')}.json", result)
    write_json(
        out / "summary.json",
        {
            "when": when,
            "quick": args.quick,
            "machine": machine,
            "loadavg_1m_at_end": Machine.here().loadavg_1m,
            "rows": rows,
            "parts": results,
        },
    )
    latest = out.parent / "latest"
    if out.parent == REPO / "results":
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    print(text_table(rows))
    if args.publish:
        publish(rows, machine, options, when)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
