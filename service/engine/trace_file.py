"""An async job's trace on disk, so that a run the trainer's process did not survive can still be replayed.

With ``POLYAK_ASYNC_TRACE=1`` in the environment of the process that trains (``polyak serve``, ``polyak train``),
async jobs run with the parameter server's trace on (service/engine/parameter_server.py: Update, Join, Stop, and the
engine's Restore) and the trainer writes the records it has not yet written into the job dir as each epoch is
counted, before that epoch's checkpoint: ``trace-000001.json``, ``trace-000002.json``, ... in the order written,
each file whole or absent. A process that dies and a new one that resumes the job leave one sequence: the new
engine's records begin with its Restore of the checkpoint, whose version an earlier file produced. A testing aid
(bench/chaos.py replays every async job of a chaos run from it), off by default: it costs a file per epoch and
the rows of every update.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from polyak.contract.atomic import atomic_write

TRACE_ENV = "POLYAK_ASYNC_TRACE"
PREFIX = "trace-"


def tracing_requested() -> bool:
    return os.environ.get(TRACE_ENV, "") not in ("", "0")


def write_part(job_dir: Path, records: list) -> None:
    """The records as the job dir's next trace file."""
    if not records:
        return
    number = len(list(job_dir.glob(f"{PREFIX}*.json"))) + 1
    lines = [json.dumps({"kind": type(r).__name__, **_plain(asdict(r))}) for r in records]
    atomic_write(job_dir / f"{PREFIX}{number:06d}.json", lambda f: f.write("\n".join(lines).encode()))


def _plain(fields: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in fields.items()}


def read_trace(job_dir: Path) -> list:
    """Every record the job dir's trace files hold, in the order written, as the server's record classes."""
    from polyak.service.engine import parameter_server as ps  # Ray's: only a reader of a traced Ray job needs it

    kinds = {cls.__name__: cls for cls in (ps.Update, ps.Join, ps.Stop, ps.Restore)}
    records = []
    for path in sorted(job_dir.glob(f"{PREFIX}*.json")):
        for line in path.read_text().splitlines():
            fields = json.loads(line)
            cls = kinds[fields.pop("kind")]
            if "rows" in fields:
                fields["rows"] = np.asarray(fields["rows"], dtype=np.int64)
            records.append(cls(**fields))
    return records
