"""Sweeps: a grid over dotted spec keys, checked whole before any job is queued, and the ranking of jobs.

Pure: no HTTP and no click. ``plan_sweep`` turns a spec and a grid into one JobSpec per combination (or a
SpecError naming every bad key or value); ``Client.submit_sweep`` queues a plan as one group and returns a
``Sweep``; ``rank`` orders any jobs by a metric of their last epoch, which ``polyak sweep`` and
``polyak compare`` both print.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from polyak.contract.errors import BadInput, SpecError
from polyak.contract.spec import JobSpec, parse_spec
from polyak.contract.wire import EpochMetrics, JobInfo, JobState, StopReason

# Metrics a job can be ranked by: figures of its last epoch. Larger is better for these two.
RANK_METRICS = ("val_loss", "train_loss", "val_accuracy", "samples_per_second", "weight_change",
                "grad_avg_norm", "grad_noise", "elapsed_seconds")
MAXIMIZED = frozenset({"val_accuracy", "samples_per_second"})
# The sweep sets these itself: every job is named by its params and carries the sweep's group.
_RESERVED_KEYS = {"name", "group"}
# PyYAML reads YAML 1.1, where 1e-3 (no dot) is a string; a user writing it on the command line means a number.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# --- the grid ----------------------------------------------------------------------------------------------


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``"optimizer.lr=0.05,0.2"`` -> ``("optimizer.lr", [0.05, 0.2])``; each value a YAML scalar, or a
    bracketed list (``model.layers=[4,3],[4,16,3]``): commas inside brackets do not split."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _grid_error(text, "expected KEY=V1,V2,... (for example optimizer.lr=0.05,0.2)")
    items = _split_top_level(values)
    if any(not item.strip() for item in items):
        raise _grid_error(key, f"empty value in {values!r}; write null for a null value")
    parsed = [_scalar(item.strip(), key) for item in items]
    return key, parsed


def parse_grid(options: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """Every ``--grid`` option into one grid; a key given twice is an error (which values would it mean?)."""
    grid: dict[str, list[Any]] = {}
    for text in options:
        key, values = parse_grid_option(text)
        if key in grid:
            raise _grid_error(key, "given twice; list all its values in one --grid")
        grid[key] = values
    return grid


def check_key(key: str) -> None:
    """``key`` must name one field of JobSpec, dotted (``optimizer.lr``), and not a whole section."""
    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the spec"
        fields = model.model_fields
        if part not in fields:
            raise _grid_error(key, f"not a spec field; {where} has {', '.join(fields)}")
        annotation = fields[part].annotation
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1:
            if not section:
                raise _grid_error(key, f"not a spec field; {'.'.join(parts[:depth + 1])} has no fields")
            model = annotation
        elif section:
            raise _grid_error(key, f"a section, not a field; name one of {', '.join(annotation.model_fields)}")
    if key in _RESERVED_KEYS:
        raise _grid_error(key, "set by the sweep itself (jobs are named by their params; --group sets the group)")


def expand(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cross product, the first key varying slowest: ``{a: [1, 2], b: [3]}`` -> ``[{a: 1, b: 3}, {a: 2, b: 3}]``."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


# --- the plan: every combination validated before anything is queued ---------------------------------------


@dataclass(frozen=True)
class Trial:
    params: dict[str, Any]  # dotted key -> the value as the validated spec holds it
    spec: JobSpec


@dataclass(frozen=True)
class SweepPlan:
    group: str
    trials: list[Trial]


def new_group_name(now: datetime | None = None) -> str:
    """``sweep-20260131-142501-9f3a``: readable, sortable by time, and unlikely to meet another's."""
    return f"sweep-{(now or datetime.now()).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def spec_source(spec: str | Path | dict[str, Any] | JobSpec) -> Path | dict[str, Any] | JobSpec:
    """What the SDK's methods take as a spec, for ``parse_spec``: a str there is a spec file's name."""
    return Path(spec) if isinstance(spec, str) else spec


def plan_sweep(spec: str | Path | dict[str, Any] | JobSpec, grid: dict[str, list[Any]],
               group: str | None = None) -> SweepPlan:
    """One JobSpec per combination of ``grid``, all valid, or a SpecError naming each bad key and value."""
    base = parse_spec(spec_source(spec))
    if not grid:
        raise SpecError("an empty grid: give at least one KEY=V1,V2,...", [{"field": "(grid)", "message": "empty"}])
    for key, values in grid.items():
        check_key(key)
        if not values:
            raise _grid_error(key, "no values")
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise _grid_error(key, f"repeats {repeated[0]!r}: the sweep would run the same job twice")
    group = group or new_group_name()
    stem = base.name or (Path(spec).stem if isinstance(spec, (str, Path)) else "sweep")
    base_dict = parse_spec({**base.model_dump(mode="json"), "group": group}).model_dump(mode="json")
    trials, problems = [], {}
    for combo in expand(grid):
        try:
            job_spec = parse_spec(_with_values(base_dict, combo))
        except SpecError as e:
            for err in e.errors:
                problems.setdefault(_blame(err, combo), err)
            continue
        validated = job_spec.model_dump(mode="json")
        params = {key: _get(validated, key) for key in combo}
        trials.append(Trial(params, job_spec.model_copy(update={"name": f"{stem} {job_label(params)}"})))
    if problems:
        message = "bad grid, nothing submitted: " + "; ".join(problems)
        raise SpecError(message, [{"field": err["field"], "message": where} for where, err in problems.items()])
    return SweepPlan(group, trials)


def job_label(params: dict[str, Any]) -> str:
    """``method=sgd lr=0.05``: each key by its last part, unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in params]
    return " ".join(f"{short if last.count(short) == 1 else key}={value_text(value)}"
                    for (key, value), short in zip(params.items(), last, strict=True))


def _blame(err: dict[str, str], combo: dict[str, Any]) -> str:
    """The grid value a field error belongs to (``optimizer.lr=-1: must be > 0``), else the combination."""
    field = err["field"]
    for key, value in combo.items():
        if field == key or field.startswith(key + "."):
            return f"{key}={value_text(value)}: {err['message']}"
    return f"{field}: {err['message']} (with {job_label(combo)})"


def _with_values(spec: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in spec.items()}  # sections are one level deep
    for key, value in params.items():
        *sections, field = key.split(".")
        target = out
        for section in sections:
            target = target[section]
        target[field] = value
    return out


def _get(spec: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        spec = spec[part]
    return spec


# --- the sweep as submitted ---------------------------------------------------------------------------------


# --- ranking -------------------------------------------------------------------------------------------------


class RankedJob(BaseModel):
    """One row of a ranking, best first; also the JSON line of ``polyak sweep/compare --json``."""

    id: str
    state: JobState
    stop_reason: StopReason | None
    epochs: int
    params: dict[str, Any]
    final: EpochMetrics | None


def default_metric(specs: list[JobSpec]) -> str:
    """``val_loss`` when the jobs hold out validation data, else ``train_loss``."""
    return "val_loss" if any(s.data.validation_fraction > 0 for s in specs) else "train_loss"


def default_mode(metric: str) -> str:
    return "max" if metric in MAXIMIZED else "min"


def rank(infos: list[JobInfo], params: list[dict[str, Any]], metric: str | None = None,
         mode: str | None = None) -> list[RankedJob]:
    """Jobs best first by ``metric`` of their last epoch (``mode`` min or max; defaults as above). A job without
    the figure (it failed or was cancelled before an epoch ended, diverged, has no validation data) comes last;
    ties keep the given order."""
    metric = metric or default_metric([i.spec for i in infos])
    if metric not in RANK_METRICS:
        raise BadInput(f"--metric {metric}: must be one of {', '.join(RANK_METRICS)}")
    mode = mode or default_mode(metric)
    if mode not in ("min", "max"):
        raise BadInput(f"--mode {mode}: must be min or max")
    rows = [RankedJob(id=i.id, state=i.state, stop_reason=i.stop_reason, epochs=i.epoch or 0, params=p,
                      final=i.metrics) for i, p in zip(infos, params, strict=True)]
    sign = -1.0 if mode == "max" else 1.0

    def key(row: RankedJob) -> tuple[bool, float]:
        value = metric_value(row.final, metric)
        return (value is None, 0.0 if value is None else sign * value)

    return sorted(rows, key=key)


def metric_value(final: EpochMetrics | None, metric: str) -> float | None:
    """The figure, or None when there is none to rank by (no epoch, not reported, NaN or inf)."""
    value = None if final is None else getattr(final, metric)
    return None if value is None or not math.isfinite(value) else float(value)


def differing_params(specs: list[JobSpec]) -> list[dict[str, Any]]:
    """Per spec, the dotted fields whose values are not the same in all of them (name and group aside)."""
    flat = [_flatten(s.model_dump(mode="json")) for s in specs]
    keys = [k for k in flat[0] if k not in _RESERVED_KEYS and any(f[k] != flat[0][k] for f in flat)] if flat else []
    return [{k: f[k] for k in keys} for f in flat]


def _flatten(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --- small helpers -------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def _scalar(text: str, key: str) -> Any:
    if _EXPONENT_NUMBER.fullmatch(text):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _grid_error(key, f"{text!r} is not a YAML value ({getattr(e, 'problem', None) or e})") from None


def value_text(value: Any) -> str:
    """A value as a user would type it in a grid: YAML, on one line (``0.05``, ``sgd``, ``[4, 3]``, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _grid_error(key: str, message: str) -> SpecError:
    return SpecError(f"--grid {key}: {message}", [{"field": key, "message": message}])
