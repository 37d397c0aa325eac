"""One spec as a Ray job, without the service: submit it to a cluster's dashboard and follow its metrics.

``submit_spec`` validates the spec here, uploads ``working_dir`` (a checkout of polyak runs from there as
it is; any other folder gets the polyak package this process runs as ``py_modules``) and runs
``python -m polyak train SPEC --json`` on the cluster; ``follow`` reads the job's log and yields every
``EpochMetrics`` line as it appears.

    from polyak.client.ray_job import follow, submit_spec
    job_id = submit_spec("http://127.0.0.1:8265", "examples/digits.yaml")
    for m in follow("http://127.0.0.1:8265", job_id):
        print(m.epoch, m.train_loss)

Ray is imported only inside these functions (``client`` stays free of Ray at import time). Token
authentication is Ray's own: with ``RAY_AUTH_MODE=token`` in the environment Ray's client sends the
token it finds in ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``;
``token=`` sends the given one instead, whatever the environment says.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from polyak.contract.errors import RAY_AUTH_HINT, BadInput, PolyakError, Unauthorized, Unreachable
from polyak.contract.spec import parse_spec
from polyak.contract.wire import EpochMetrics

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"

# What deploy/runtime_env.yaml leaves behind (tests/test_ray_job.py keeps the two in step); Ray also
# honours .gitignore. None of it is needed to run a job, and every byte goes to every node.
DEFAULT_EXCLUDES = (
    "/.venv", "/.git", "/.polyak", "/build", "__pycache__", "*.egg-info", "*.npz", "/bench",
)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# `polyak train --emit-weights` prints the weights file as {WEIGHTS_LINE_KEY: base64} on one line of its log.
WEIGHTS_LINE_KEY = "polyak_weights_npz_base64"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RayJobFailed(PolyakError):
    """The Ray job ended FAILED or STOPPED; ``error_line`` is the last ``error:`` line of its log."""

    def __init__(self, message: str, submission_id: str, status: str, error_line: str | None, logs: str):
        super().__init__(message)
        self.submission_id = submission_id
        self.status = status
        self.error_line = error_line
        self.logs = logs


def entrypoint(spec_relpath: str, extra_args: Sequence[str] = ()) -> str:
    """The job's command line: ``polyak train`` with one JSON metrics object per epoch on stdout."""
    args = ["python", "-m", "polyak", "train", spec_relpath, "--json", "--emit-weights", *extra_args]
    return shlex.join(args)


def submit_spec(
    address: str,
    spec_path: str | Path,
    working_dir: str | Path = ".",
    runtime_env: dict[str, Any] | None = None,
    extra_args: Sequence[str] = (),
    *,
    submission_id: str | None = None,
    token: str | None = None,
) -> str:
    """Submit the spec file as a Ray job on the cluster whose dashboard is ``address``; its submission id.

    The spec is parsed first, so a bad one fails here with a SpecError and nothing is submitted. It
    must lie inside ``working_dir``, which is uploaded as the job's working directory. ``runtime_env``
    replaces the default ``{"working_dir": working_dir, "excludes": DEFAULT_EXCLUDES}``; without a
    ``working_dir`` of its own it gets this one, and when that folder is no checkout of polyak (and no
    ``py_modules`` are given), the package this process runs. ``extra_args`` are appended to
    ``polyak train``'s; a spec with workers also gets ``--ray-address auto`` unless they name an address.
    """
    spec_path, working_dir = Path(spec_path), Path(working_dir)
    spec = parse_spec(spec_path)
    if not working_dir.is_dir():
        raise BadInput(f"working dir {working_dir} is not a directory")
    try:
        relpath = spec_path.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise BadInput(
            f"{spec_path} is not inside the working dir {working_dir.resolve()}: the job could not read it"
        ) from None
    env = dict(runtime_env) if runtime_env is not None else {"excludes": list(DEFAULT_EXCLUDES)}
    env.setdefault("working_dir", str(working_dir))
    if "py_modules" not in env and not (Path(env["working_dir"]) / "polyak" / "__init__.py").is_file():
        from polyak.shipping import shippable_package

        env["py_modules"] = [shippable_package()]
    extra_args = list(extra_args)
    if spec.cluster.num_workers > 0 and "--ray-address" not in extra_args:
        # Join the cluster the job runs on (Ray sets RAY_ADDRESS for the entrypoint). Without it a
        # `polyak train` of this version starts a private Ray inside the job, whose workers cannot
        # fetch the job's working_dir.
        extra_args += ["--ray-address", "auto"]
    metadata = {"polyak_spec": relpath.as_posix()}
    if spec.name:
        metadata["polyak_name"] = spec.name
    client = _client(address, token)
    try:
        return client.submit_job(
            entrypoint=entrypoint(relpath.as_posix(), extra_args),
            runtime_env=env,
            submission_id=submission_id,
            metadata=metadata,
        )
    except Exception as e:  # Ray raises RuntimeError, ValueError, requests' errors, ...
        raise PolyakError(f"cannot submit {spec_path} to {address}: {_reason(e)}") from e


def follow(
    address: str,
    submission_id: str,
    poll: float = 1.0,
    timeout: float | None = None,
    *,
    token: str | None = None,
) -> Iterator[EpochMetrics]:
    """Every epoch's metrics of the job, from its log, as they appear, until the job ends.

    Returns when the job SUCCEEDED; raises RayJobFailed (a PolyakError) carrying the log's last
    ``error:`` line when it FAILED or was STOPPED, and PolyakError when ``timeout`` seconds pass first.
    Lines that are not EpochMetrics JSON (Ray's own, the final summary line) are skipped.
    """
    client = _client(address, token)
    deadline = None if timeout is None else time.monotonic() + timeout
    consumed = 0  # characters of the log already turned into lines
    while True:
        # The status first: logs read after it saw the end are complete.
        status = _call(client.get_job_status, submission_id, address)
        logs = _call(client.get_job_logs, submission_id, address)
        terminal = status in TERMINAL
        # A line still being written has no newline yet; it is read on the next round.
        end = len(logs) if terminal else logs.rfind("\n") + 1
        if end > consumed:
            for line in logs[consumed:end].splitlines():
                metrics = parse_metrics_line(line)
                if metrics is not None:
                    yield metrics
            consumed = end
        if terminal:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise PolyakError(f"ray job {submission_id} is still {status} after {timeout:g} s")
        time.sleep(poll)
    if status == "SUCCEEDED":
        return
    line = last_error_line(logs)
    if line is None:
        info = _call(client.get_job_info, submission_id, address)
        reason = (info.message or "no error in its log").strip().splitlines()[0]
    else:
        reason = line.removeprefix("error:").strip()
    raise RayJobFailed(f"ray job {submission_id} {status}: {reason}", submission_id, status, line, logs)


def fetch_weights(address: str, submission_id: str, *, token: str | None = None) -> bytes:
    """The weights file a finished job printed into its log (``polyak train --emit-weights``)."""
    import base64

    client = _client(address, token)
    logs = _call(client.get_job_logs, submission_id, address)
    for line in reversed(logs.splitlines()):
        line = _ANSI.sub("", line).strip()
        if WEIGHTS_LINE_KEY in line and line.startswith("{"):
            try:
                return base64.b64decode(json.loads(line)[WEIGHTS_LINE_KEY])
            except (ValueError, KeyError, TypeError):
                break
    raise PolyakError(f"ray job {submission_id} left no weights in its log (did it finish an epoch?)")


def job_status(address: str, submission_id: str, *, token: str | None = None) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = _client(address, token)
    return _call(client.get_job_status, submission_id, address)


def parse_metrics_line(line: str) -> EpochMetrics | None:
    """The EpochMetrics on a log line, or None for any other line."""
    line = _ANSI.sub("", line).strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "epoch" not in data:
        return None
    try:
        return EpochMetrics.model_validate(data)
    except ValidationError:
        return None


def last_error_line(logs: str) -> str | None:
    """The last ``error: ...`` line ``polyak train`` wrote, else a traceback's closing line, else None."""
    lines = [_ANSI.sub("", line).strip() for line in logs.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            closing = [x for x in lines[i + 1:] if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", x)]
            return closing[-1] if closing else None
    return None


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:
        reason = _reason(e)
        if _is_auth_failure(e):  # reached, but it wants a token (or another one)
            raise Unauthorized(f"the Ray dashboard at {address} refused us ({reason}): {RAY_AUTH_HINT}") from None
        raise Unreachable(f"cannot reach the Ray dashboard at {address}: {reason}") from e


def _is_auth_failure(e: Exception) -> bool:
    """Ray's dashboard client raises AuthenticationError for a 401/403 (a missing or wrong token)."""
    from ray.exceptions import AuthenticationError

    return isinstance(e, AuthenticationError)


def _call(method, submission_id: str, address: str):
    try:
        result = method(submission_id)
    except Exception as e:
        raise PolyakError(f"ray job {submission_id} at {address}: {_reason(e)}") from e
    return getattr(result, "value", result)  # JobStatus is a str enum


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text) > 500 else text
