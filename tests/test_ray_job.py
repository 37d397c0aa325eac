"""client.ray_job and `polyak ray-submit` without a cluster: a scripted JobSubmissionClient stands in.

tests/test_cluster.py runs the same code against a real Ray head.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from polyak.cli import cli
from polyak.client import ray_job
from polyak.client.ray_job import (
    DEFAULT_EXCLUDES,
    RayJobFailed,
    entrypoint,
    follow,
    last_error_line,
    parse_metrics_line,
    submit_spec,
)
from polyak.contract.errors import PolyakError, SpecError
from polyak.contract.wire import Criterion, EpochMetrics
from polyak.shipping import shippable_package

REPO = Path(__file__).resolve().parents[1]
ADDRESS = "http://ray.test:8265"
IRIS = {
    "name": "iris",
    "model": {"layers": [4, 8, 3]},
    "data": {"source": "sklearn", "name": "iris"},
    "stopping": {"max_epochs": 3},
    "cluster": {"num_workers": 2},
}


def metrics(epoch: int, stop: str | None = None) -> EpochMetrics:
    return EpochMetrics(
        job_id="train", epoch=epoch, step=10 * epoch, samples_seen=150 * epoch, batch_size=16, lr=0.5,
        train_loss=1.0 / epoch, weight_norm=3.0, weight_change=0.1, grad_avg_norm=0.2, grad_noise=0.1,
        samples_per_second=1000.0, elapsed_seconds=0.1 * epoch,
        criteria=[Criterion(name="max_epochs", value=epoch, threshold=3, met=stop is not None)], stop=stop,
    )


class FakeJobs:
    """A JobSubmissionClient whose job status and log follow a script, one step per status poll."""

    def __init__(self, script: list[tuple[str, str]] | None = None, message: str = ""):
        self.script = script or []  # (status, whole log so far) per poll
        self.polls = 0
        self.submitted: list[dict] = []
        self.message = message

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return "raysubmit_test"

    def get_job_status(self, job_id):
        self.polls += 1
        return self.script[min(self.polls, len(self.script)) - 1][0]

    def get_job_logs(self, job_id):
        return self.script[min(self.polls, len(self.script)) - 1][1]

    def get_job_info(self, job_id):
        return type("Info", (), {"message": self.message})()


@pytest.fixture
def fake(monkeypatch):
    jobs = FakeJobs()
    monkeypatch.setattr(ray_job, "_client", lambda address, token: jobs)
    monkeypatch.setattr(ray_job.time, "sleep", lambda s: None)
    return jobs


def spec_in(folder: Path, spec: dict = IRIS, name: str = "spec.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def test_importing_the_helper_and_the_cli_imports_no_ray():
    code = ("import sys, polyak.client.ray_job, polyak.cli; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_default_excludes_match_deploy_runtime_env():
    runtime_env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert sorted(runtime_env["excludes"]) == sorted(DEFAULT_EXCLUDES)


def test_entrypoint_quotes_every_argument():
    line = entrypoint("my specs/a b.yaml", ["--job-dir", "x y"])
    assert shlex.split(line) == [
        "python", "-m", "polyak", "train", "my specs/a b.yaml", "--json", "--emit-weights", "--job-dir", "x y",
    ]


def test_submit_spec_sends_the_entrypoint_and_working_dir(fake, tmp_path):
    spec = spec_in(tmp_path / "specs")
    assert submit_spec(ADDRESS, spec, tmp_path) == "raysubmit_test"
    (job,) = fake.submitted
    assert shlex.split(job["entrypoint"]) == [
        "python", "-m", "polyak", "train", "specs/spec.yaml", "--json", "--emit-weights",
        "--ray-address", "auto",
    ]
    assert job["runtime_env"] == {"working_dir": str(tmp_path), "excludes": list(DEFAULT_EXCLUDES),
                                  "py_modules": [shippable_package()]}
    assert job["metadata"] == {"polyak_spec": "specs/spec.yaml", "polyak_name": "iris"}


def test_submit_spec_keeps_a_given_runtime_env_and_address(fake, tmp_path):
    local = {**IRIS, "cluster": {"num_workers": 0}}
    submit_spec(ADDRESS, spec_in(tmp_path, local), tmp_path, {"pip": ["x"]})
    submit_spec(ADDRESS, spec_in(tmp_path), tmp_path, {"working_dir": "/elsewhere"}, ["--ray-address", "h:1"])
    first, second = fake.submitted
    assert "--ray-address" not in first["entrypoint"]  # no workers: polyak train never starts Ray
    assert first["runtime_env"] == {"pip": ["x"], "working_dir": str(tmp_path), "py_modules": [shippable_package()]}
    assert second["runtime_env"] == {"working_dir": "/elsewhere", "py_modules": [shippable_package()]}
    assert shlex.split(second["entrypoint"])[-2:] == ["--ray-address", "h:1"]


def test_submit_spec_rejects_before_submitting(fake, tmp_path):
    bad = spec_in(tmp_path, {**IRIS, "stopping": {"max_epochs": -1}})
    with pytest.raises(SpecError, match="stopping.max_epochs"):
        submit_spec(ADDRESS, bad, tmp_path)
    with pytest.raises(SpecError, match="cannot read spec"):
        submit_spec(ADDRESS, tmp_path / "missing.yaml", tmp_path)
    (tmp_path / "b").mkdir()
    with pytest.raises(PolyakError, match="not inside the working dir"):
        submit_spec(ADDRESS, spec_in(tmp_path / "a"), tmp_path / "b")
    assert fake.submitted == []


def test_follow_yields_each_epoch_once_as_lines_complete(fake):
    lines = [
        "Running entrypoint for job raysubmit_test: python -m polyak train spec.yaml --json",
        metrics(1).model_dump_json(),
        "(GradientWorker pid=12) some log line {not json}",
        metrics(2).model_dump_json(),
        metrics(3, "max_epochs").model_dump_json(),
        '{"state": "succeeded", "stop_reason": "max_epochs", "error": null, "weights": "weights.npz"}',
    ]
    whole = "\n".join(lines) + "\n"
    half = whole.index(lines[3]) + 20  # the second epoch's line is half written
    fake.script = [("PENDING", ""), ("RUNNING", whole[:half]), ("RUNNING", whole[:half]), ("SUCCEEDED", whole)]
    seen = [m.epoch for m in follow(ADDRESS, "raysubmit_test")]
    assert seen == [1, 2, 3]


def test_follow_raises_the_last_error_line_of_a_failed_job(fake):
    log = metrics(1).model_dump_json() + "\nerror: something earlier\n"
    log += "\x1b[31merror: diverged at epoch 2, step 7\x1b[0m\n"  # click's red, were it a terminal
    fake.script = [("RUNNING", ""), ("FAILED", log)]
    seen = []
    with pytest.raises(RayJobFailed) as failed:
        for m in follow(ADDRESS, "raysubmit_test"):
            seen.append(m.epoch)
    assert seen == [1]
    e = failed.value
    assert e.status == "FAILED" and e.error_line == "error: diverged at epoch 2, step 7"
    assert e.message == "ray job raysubmit_test FAILED: diverged at epoch 2, step 7"


def test_follow_falls_back_to_ray_s_message(fake):
    fake.script = [("STOPPED", "")]
    fake.message = "Job was intentionally stopped.\nmore"
    with pytest.raises(RayJobFailed, match="STOPPED: Job was intentionally stopped.$"):
        list(follow(ADDRESS, "raysubmit_test"))


def test_follow_gives_up_after_its_timeout(fake, monkeypatch):
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(ray_job.time, "monotonic", lambda: next(clock))
    fake.script = [("RUNNING", "")]
    with pytest.raises(PolyakError, match="still RUNNING after 12 s"):
        list(follow(ADDRESS, "raysubmit_test", timeout=12))


def test_parse_metrics_line_takes_only_epoch_metrics():
    assert parse_metrics_line(metrics(4).model_dump_json()).epoch == 4
    assert parse_metrics_line("  " + metrics(4).model_dump_json() + "\r") is not None
    for line in ("", "epoch 4", "{", '{"epoch": 1}', '{"state": "succeeded"}', "[1, 2]"):
        assert parse_metrics_line(line) is None


def test_last_error_line():
    assert last_error_line("a\nerror: one\nb\nerror: two\nc\n") == "error: two"
    traceback = "x\nTraceback (most recent call last):\n  File \"a.py\", line 1\nValueError: bad thing\n"
    assert last_error_line(traceback) == "ValueError: bad thing"
    assert last_error_line("all\nfine\n") is None


def test_ray_submit_command_follows_to_the_end(monkeypatch, tmp_path):
    spec = spec_in(tmp_path)
    calls = {}

    def submit(address, spec_path, working_dir, runtime_env):
        calls.update(address=address, spec=spec_path, working_dir=working_dir, runtime_env=runtime_env)
        return "raysubmit_cli"

    monkeypatch.setattr(ray_job, "submit_spec", submit)
    history = [metrics(1), metrics(2), metrics(3, "max_epochs")]
    monkeypatch.setattr(ray_job, "follow", lambda address, job_id: iter(history))
    result = CliRunner().invoke(cli, ["ray-submit", str(spec), "--address", ADDRESS, "--working-dir", str(tmp_path),
                                      "--follow"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "raysubmit_cli" and lines[1].startswith("epoch 1/3")
    assert "job succeeded (max_epochs)" in lines[-1]
    assert calls == {"address": ADDRESS, "spec": spec, "working_dir": tmp_path, "runtime_env": None}


def test_ray_submit_command_reports_a_failed_job(monkeypatch, tmp_path):
    def failing(address, job_id):
        yield metrics(1)
        raise RayJobFailed("ray job j FAILED: diverged at epoch 2", "j", "FAILED", "error: diverged at epoch 2", "")

    monkeypatch.setattr(ray_job, "submit_spec", lambda *a: "j")
    monkeypatch.setattr(ray_job, "follow", failing)
    env_file = tmp_path / "env.yaml"
    env_file.write_text("working_dir: .\nexcludes: [/bench]\n")
    result = CliRunner().invoke(cli, ["ray-submit", str(spec_in(tmp_path)), "--working-dir", str(tmp_path),
                                      "--runtime-env", str(env_file), "--follow"])
    assert result.exit_code == 1
    assert "job failed" in result.output and "diverged at epoch 2" in result.output


def test_ray_submit_command_turns_errors_into_one_line(tmp_path):
    # Nothing listens on port 1: Ray's own client fails to connect, and ray_job says so as Unreachable.
    result = CliRunner().invoke(cli, ["ray-submit", str(spec_in(tmp_path)), "--working-dir", str(tmp_path),
                                      "--address", "http://127.0.0.1:1"])
    assert result.exit_code == 3  # cannot reach: the exit-code convention of `polyak --help`
    assert "error: cannot reach the Ray dashboard" in result.output
    bad = spec_in(tmp_path, {**IRIS, "model": {"layers": [4]}}, "bad.yaml")
    result = CliRunner().invoke(cli, ["ray-submit", str(bad), "--working-dir", str(tmp_path)])
    assert result.exit_code == 2 and "model.layers" in result.output  # bad input
