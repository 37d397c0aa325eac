"""Chaos run (issue 22): a sweep of sync and async jobs on a real `polyak serve` while a seeded nemesis SIGKILLs the
service, parameter servers, gradient workers and (--two-nodes) the second node of a two-raylet cluster.

    python bench/chaos.py --faults 100 --seed 1                # single node: service, parameter server, worker
    python bench/chaos.py --faults 100 --seed 1 --two-nodes    # and the second node's raylet, killed and restarted

Rounds of the sweep (digits 64-32-10, float64, 4 epochs; cluster.mode sync/async x optimizer.method) run until the
N faults are spent. Printed: faults injected by kind, jobs, sync jobs equal to their undisturbed in-process run
(every epoch's figures, final and best weights to 1e-12), async jobs whose trace replays to their weights with
every row applied once per epoch, jobs that failed and were resubmitted, and jobs lost. Every fault (seed, time,
kind, target, outcome) and every job's checks are in chaos-log.jsonl in the run's folder (--keep to keep it).
The harness is bench/_chaos.py.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _chaos import Config, Run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--two-nodes", action="store_true", help="on a two-raylet cluster; adds node faults")
    parser.add_argument("--methods", default="heavy_ball,nesterov,sgd",
                        help="optimizer.method values of the sweep (each in sync and async)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (logs, data dir)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop)  # a run in the background ignores SIGINT: TERM cleans up as Ctrl-C does
    config = Config(seed=args.seed, faults=args.faults, two_nodes=args.two_nodes,
                    methods=tuple(args.methods.split(",")))
    folder = Path(tempfile.mkdtemp(prefix="polyak-chaos-", dir="/tmp"))
    console = Console()
    console.print(f"chaos run: seed {args.seed}, {args.faults} faults, "
                  f"{'two nodes' if args.two_nodes else 'single node'}; folder {folder}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        faults = progress.add_task("faults", total=args.faults)
        jobs = progress.add_task("jobs settled", total=0)
        report = Run(config, folder, on_event(progress, faults, jobs)).execute()
    print_report(console, report)
    if args.keep:
        console.print(f"kept {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if report.summary()["lost"] == 0 and not report.leftovers and report.integrity == "ok" else 1


def stop(signum, frame) -> None:
    raise KeyboardInterrupt


def on_event(progress: Progress, faults, jobs):
    """The harness's events as progress bars and one log line per fault, failure and problem."""

    def show(event: str, record: dict) -> None:
        if event == "fault":
            progress.advance(faults)
            progress.console.log(f"fault {record['number']} at {record['at']:.1f} s: {record['kind']} "
                                 f"-> {record['target']}: {record['outcome']}")
        elif event == "round":
            progress.update(jobs, total=progress.tasks[jobs].total + len(record["jobs"]))
        elif event in ("job_done", "job_given_up"):
            progress.advance(jobs)
        elif event in ("job_failed", "job_given_up", "resubmit_refused", "resubmitted", "nemesis_error"):
            progress.console.log(f"{event}: {record}")
        elif event == "checked" and record["problems"]:
            progress.console.log(f"[red]job {record['ids']} {record['params']}: {record['problems'][:5]}")

    return show


def print_report(console: Console, report) -> None:
    s = report.summary()
    table = Table(title=f"chaos run, seed {s['seed']}: {s['seconds']:.0f} s")
    table.add_column("figure")
    table.add_column("value", justify="right")
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items()))
    rows = [
        ("faults injected", f"{s['faults']} ({by_kind}); missed {s['missed']}"),
        ("jobs", f"{s['jobs']} ({s['sync']} sync, {s['async']} async)"),
        ("sync equal to reference (1e-12)", f"{s['equal_to_reference']} of {s['sync']}"),
        ("async replayed exactly, rows once per epoch", f"{s['replayed_exactly']} of {s['async']}"),
        ("failed and resubmitted", str(s["failed_and_resubmitted"])),
        ("  of which submitted again (no checkpoint)", str(s["submitted_again"])),
        ("lost", str(s["lost"])),
        ("processes outliving their job", str(s["leftovers"])),
        ("PRAGMA integrity_check", s["integrity"]),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for chain in report.chains:
        if chain.problems:
            console.print(f"[red]lost: {chain.ids} {chain.params}: {chain.problems[:5]}")
    for line in report.leftovers:
        console.print(f"[red]{line}")


if __name__ == "__main__":
    sys.exit(main())
