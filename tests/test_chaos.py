"""Chaos (issue 22): the seeded schedule of bench/chaos.py's nemesis depends on the seed alone.

The seeded end-to-end run (`python bench/chaos.py --faults 3 --seed 5`: a worker, the service and a parameter server
killed while a sync and an async job run, every outcome checked) is not in the suite: it passed in one full CI run
and took over 13 minutes in the next, so it stays a benchmark until it is reliably short.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _chaos import (  # noqa: E402
    KINDS,
    schedule,
)

pytestmark = pytest.mark.slow

SEED = 5  # its first three faults: a worker, the service, the parameter server


def test_the_schedule_is_the_seeds_alone():
    assert schedule(SEED, 3, KINDS, (0.5, 4.0)) == schedule(SEED, 3, KINDS, (0.5, 4.0))
    assert [p.kind for p in schedule(SEED, 3, KINDS, (0.5, 4.0))] == ["worker", "service", "parameter_server"]
    assert schedule(SEED, 3, KINDS, (0.5, 4.0)) != schedule(SEED + 1, 3, KINDS, (0.5, 4.0))
