"""The client CLI commands through click's CliRunner, on a Client whose transport is a mock server."""

from __future__ import annotations

import io
import json
import math
import os
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from polyak import Client, Criterion, EpochMetrics, JobInfo, JobSpec, JobState, StopReason
from polyak.cli import cli
from polyak.client.display import TrainingDisplay, compact_line, final_line, metrics_table
from polyak.client.plot import _figure, plot_metrics

URL = "http://polyak.test:8765"
DONE, QUEUED = "9b1e0c7d3a52", "4c8f2a6e1d07"
MAX_EPOCHS = 30
CREATED = datetime(2025, 3, 14, 9, 26, 53, tzinfo=timezone.utc)
WEIGHTS = {
    "W1": np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64),
    "b1": np.full(64, 0.01, np.float32),
    "W2": np.linspace(-0.5, 0.5, 10 * 64, dtype=np.float32).reshape(10, 64),
    "b2": np.zeros(10, np.float32),
}


def epoch_metrics(epoch: int, job_id: str = DONE) -> EpochMetrics:
    """The digits MLP converging over 30 epochs, the batch growing 1.1x per epoch."""
    done = epoch == MAX_EPOCHS
    weight_change = 0.35 * 0.82**epoch
    return EpochMetrics(
        job_id=job_id,
        epoch=epoch,
        step=11 * epoch,
        samples_seen=1437 * epoch,
        batch_size=min(1437, int(128 * 1.1 ** (epoch - 1))),
        lr=0.1 / (1 + 11 * epoch / 1000),
        train_loss=2.3 * math.exp(-0.25 * epoch) + 0.03,
        val_loss=2.3 * math.exp(-0.22 * epoch) + 0.08 + 0.002 * epoch,
        val_accuracy=min(0.975, 0.42 + 0.05 * epoch),
        weight_norm=10.4 + 0.3 * epoch,
        weight_change=weight_change,
        grad_avg_norm=1.7 * 0.8**epoch,
        grad_noise=0.28 * 0.93**epoch,
        samples_per_second=51234.0,
        elapsed_seconds=0.028 * epoch,
        criteria=[
            Criterion(name="max_epochs", value=epoch, threshold=MAX_EPOCHS, met=done),
            Criterion(name="weight_change", value=weight_change, threshold=1e-4, met=False),
        ],
        stop=StopReason.MAX_EPOCHS if done else None,
    )


HISTORY = [epoch_metrics(e) for e in range(1, MAX_EPOCHS + 1)]


def job_info(job_id: str, state: JobState, history: list[EpochMetrics], name: str = "digits-mlp") -> JobInfo:
    spec = JobSpec(name=name, stopping={"max_epochs": MAX_EPOCHS}, data={"validation_fraction": 0.2})
    terminal = state.is_terminal()
    return JobInfo(
        id=job_id,
        name=name,
        state=state,
        priority=0 if terminal else 5,
        queue_position=1 if state == JobState.QUEUED else None,
        spec=spec,
        created_at=CREATED,
        started_at=CREATED + timedelta(seconds=2) if history else None,
        finished_at=CREATED + timedelta(seconds=3) if terminal else None,
        epoch=history[-1].epoch if history else None,
        stop_reason=history[-1].stop if terminal and history else None,
        metrics=history[-1] if history else None,
    )


class Server:
    """A mock polyak server with one finished and one queued job; records every request."""

    def __init__(self, final_state: JobState = JobState.SUCCEEDED):
        self.jobs = {
            DONE: job_info(DONE, final_state, HISTORY),
            QUEUED: job_info(QUEUED, JobState.QUEUED, [], name="wine-sgd"),
        }
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.strip("/").split("/")
        if parts == ["jobs"] and request.method == "POST":
            return httpx.Response(201, json=self.jobs[QUEUED].model_dump(mode="json"))
        if parts == ["jobs"]:
            state = request.url.params.get("state")
            return httpx.Response(200, json=[j.model_dump(mode="json") for j in self.jobs.values()
                                             if state in (None, j.state.value)])
        if len(parts) < 2 or parts[1] not in self.jobs:
            return httpx.Response(404, json={"detail": f"job {parts[-1]} not found"})
        job = self.jobs[parts[1]]
        route = parts[2] if len(parts) > 2 else "info"
        return getattr(self, route)(job)

    def info(self, job: JobInfo) -> httpx.Response:
        return httpx.Response(200, json=job.model_dump(mode="json"))

    def metrics(self, job: JobInfo) -> httpx.Response:
        history = HISTORY if job.id == DONE else []
        return httpx.Response(200, json=[m.model_dump(mode="json") for m in history])

    def cancel(self, job: JobInfo) -> httpx.Response:
        job = job.model_copy(update={"state": JobState.CANCELLED, "stop_reason": StopReason.CANCELLED})
        return httpx.Response(200, json=job.model_dump(mode="json"))

    def weights(self, job: JobInfo) -> httpx.Response:
        buf = io.BytesIO()
        np.savez(buf, **WEIGHTS)
        return httpx.Response(200, content=buf.getvalue())

    def events(self, job: JobInfo) -> httpx.Response:
        # Every submitted job "runs" as the finished one: 30 epochs, then `end`.
        events = [f"event: epoch\nid: {m.epoch}\ndata: {m.model_dump_json()}\n\n" for m in HISTORY]
        final = self.jobs[DONE].model_copy(update={"id": job.id})
        events.append(f"event: end\ndata: {final.model_dump_json()}\n\n")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content="".join(events))


@pytest.fixture
def server() -> Server:
    return Server()


def invoke(server: Server, *args: str, env: dict[str, str] | None = None):
    def factory(url: str, token: str | None) -> Client:
        server.url, server.token = url, token
        return Client(url, token=token, transport=httpx.MockTransport(server))

    return CliRunner().invoke(cli, list(args), obj={"client_factory": factory}, env=env)


def test_list_shows_every_job(server):
    result = invoke(server, "list")
    assert result.exit_code == 0, result.output
    for text in (DONE, QUEUED, "digits-mlp", "wine-sgd", "succeeded", "queued", "max_epochs", "30/30"):
        assert text in result.output
    assert "queue" in result.output and "created" in result.output


def test_list_filters_by_state_and_passes_url_and_token(server):
    result = invoke(server, "--url", URL, "--token", "s3cret", "list", "--state", "queued")
    assert result.exit_code == 0, result.output
    assert QUEUED in result.output and DONE not in result.output
    (request,) = server.requests
    assert request.url.params["state"] == "queued"
    assert request.headers["authorization"] == "Bearer s3cret"
    assert (server.url, server.token) == (URL, "s3cret")


def test_url_and_token_come_from_the_environment(server):
    invoke(server, "list", env={"POLYAK_URL": URL, "POLYAK_TOKEN": "env-token"})
    assert (server.url, server.token) == (URL, "env-token")


def test_status_shows_state_latest_metrics_and_criteria(server):
    result = invoke(server, "status", DONE)
    assert result.exit_code == 0, result.output
    last = HISTORY[-1]
    for text in (DONE, "digits-mlp", "succeeded", "max_epochs", "30/30", f"{last.train_loss:.4g}",
                 f"{100 * last.val_accuracy:.1f}%", "weight_change", "0.0001", "✓"):
        assert text in result.output, text


def test_status_of_a_queued_job_shows_its_queue_position(server):
    result = invoke(server, "status", QUEUED)
    assert result.exit_code == 0, result.output
    assert "queue position" in result.output and "wine-sgd" in result.output
    assert "stopping criteria" not in result.output


def test_metrics_table_has_a_row_per_epoch(server):
    result = invoke(server, "metrics", DONE)
    assert result.exit_code == 0, result.output
    assert "train loss" in result.output and "samples/s" in result.output
    for m in (HISTORY[0], HISTORY[-1]):
        assert f"{m.train_loss:.4g}" in result.output and f"{m.weight_change:.4g}" in result.output
    assert "51,234" in result.output


def test_metrics_json_lines_parse_back(server):
    result = invoke(server, "metrics", DONE, "--json")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [EpochMetrics.model_validate_json(line) for line in lines] == HISTORY


def test_cancel_reports_the_new_state(server):
    result = invoke(server, "cancel", QUEUED)
    assert result.exit_code == 0, result.output
    assert f"job {QUEUED} is cancelled" in result.output
    assert (server.requests[-1].method, server.requests[-1].url.path) == ("POST", f"/jobs/{QUEUED}/cancel")


def test_weights_writes_the_npz_to_the_exact_path(server, tmp_path):
    out = tmp_path / "digits.weights"
    result = invoke(server, "weights", DONE, "-o", str(out), "--which", "best")
    assert result.exit_code == 0, result.output
    assert server.requests[0].url.params["which"] == "best"
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(WEIGHTS)
        for name, array in WEIGHTS.items():
            np.testing.assert_array_equal(npz[name], array)
    assert "4 arrays" in result.output and "4,810 values" in result.output


def test_plot_writes_a_png(server, tmp_path):
    out = tmp_path / "curves.png"
    result = invoke(server, "plot", DONE, "-o", str(out))
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert str(out) in result.output


def test_plot_of_a_job_without_metrics_is_an_error(server, tmp_path):
    result = invoke(server, "plot", QUEUED, "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert f"error: job {QUEUED} has no metrics yet" in result.output


def test_submit_prints_the_job_id(server, tmp_path):
    spec = tmp_path / "wine.yaml"
    spec.write_text("name: wine-sgd\npriority: 5\ndata:\n  name: wine\nmodel:\n  layers: [13, 32, 3]\n")
    result = invoke(server, "submit", str(spec))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == QUEUED
    body = json.loads(server.requests[0].content)
    assert (body["priority"], body["data"]["name"]) == (5, "wine")


def test_submit_follow_prints_one_line_per_epoch_when_not_a_terminal(server, tmp_path):
    spec = tmp_path / "digits.json"
    spec.write_text(json.dumps({"name": "digits-mlp", "stopping": {"max_epochs": MAX_EPOCHS}}))
    result = invoke(server, "submit", str(spec), "--follow")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == QUEUED
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == MAX_EPOCHS
    assert epoch_lines[-1].startswith(f"epoch {MAX_EPOCHS}/{MAX_EPOCHS}  step 330")
    assert "max_epochs 30/30 ✓" in epoch_lines[-1]
    assert lines[-1] == "job succeeded (max_epochs)"


@pytest.mark.parametrize(
    ("state", "reason", "error", "last"),
    [
        (JobState.FAILED, StopReason.DIVERGED, "loss became nan at epoch 12, step 130",
         "job failed (diverged): loss became nan at epoch 12, step 130"),
        (JobState.CANCELLED, StopReason.CANCELLED, None, "job cancelled"),
    ],
)
def test_submit_follow_exits_nonzero_when_the_job_does_not_succeed(tmp_path, state, reason, error, last):
    spec = tmp_path / "digits.yaml"
    spec.write_text("name: digits-mlp\n")
    server = Server()
    update = {"state": state, "stop_reason": reason, "error": error}
    server.jobs[DONE] = server.jobs[DONE].model_copy(update=update)
    result = invoke(server, "submit", str(spec), "--follow")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == last


def test_server_error_prints_one_red_line_and_exits_1(server):
    result = invoke(server, "status", "nope")
    assert result.exit_code == 1
    assert result.output == "error: job nope not found\n"
    assert "Traceback" not in result.output


def test_bad_spec_prints_each_field_error_without_a_request(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("stopping:\n  max_epochs: -3\noptimizer:\n  momentum: 0.9\n")

    def never_called(request):
        raise AssertionError("a bad spec must not reach the server")

    result = invoke(never_called, "submit", str(spec))
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert "stopping.max_epochs" in result.output and "optimizer.momentum: unknown key" in result.output
    assert "Traceback" not in result.output


def test_rejected_spec_lists_the_server_field_errors(tmp_path):
    spec = tmp_path / "digits.yaml"
    spec.write_text("name: digits-mlp\n")
    errors = [{"field": "model.layers", "message": "layers[0] = 64 does not fit the data: X has 13 features"}]

    def reject(request):
        return httpx.Response(422, json={"detail": "job spec rejected", "errors": errors})

    result = invoke(reject, "submit", str(spec))
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: job spec rejected",
        "  model.layers: layers[0] = 64 does not fit the data: X has 13 features",
    ]


def test_unreachable_server_names_the_url():
    def refuse(request):
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    result = invoke(refuse, "--url", URL, "list")
    assert result.exit_code == 3
    assert result.output.startswith(f"error: cannot reach polyak server at {URL}: is `polyak serve` running?")
    assert "Traceback" not in result.output


def test_training_display_renders_live_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with TrainingDisplay(max_epochs=MAX_EPOCHS, console=console, title="digits-mlp") as display:
        for m in HISTORY:
            display.update(m)
        display.finish(JobState.SUCCEEDED, StopReason.MAX_EPOCHS, None)
    text = out.getvalue()
    for part in ("digits-mlp", "30/30", "train loss", "stopping criteria", "weight_change", "✓",
                 "job succeeded (max_epochs)"):
        assert part in text, part


def test_plot_skips_missing_values(tmp_path):
    # A regression job without validation data that diverges: no accuracy, no val loss, a NaN loss.
    history = [
        m.model_copy(update={"val_loss": None, "val_accuracy": None, "weight_change": None if i == 0 else 0.1,
                             "grad_noise": None, "criteria": []})
        for i, m in enumerate(HISTORY[:4])
    ]
    history[-1] = history[-1].model_copy(update={"train_loss": float("nan"), "stop": StopReason.DIVERGED})
    path = plot_metrics(history, tmp_path / "diverged.png")
    assert path.read_bytes()[:4] == b"\x89PNG"



# ------------------------------------------------------------------ -o, one behaviour, one error line


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_weights_into_a_missing_folder_is_one_error_line_before_any_request(server, tmp_path):
    out = tmp_path / "nonexistent" / "dir" / "w.npz"
    result = invoke(server, "weights", DONE, "-o", str(out))
    assert result.exit_code == 2
    assert result.output == f"error: cannot write {out}: the folder {out.parent} does not exist\n"
    assert server.requests == []


def test_plot_into_a_missing_folder_is_one_error_line(server, tmp_path):
    out = tmp_path / "nonexistent" / "x.png"
    result = invoke(server, "plot", DONE, "-o", str(out))
    assert result.exit_code == 2
    assert result.output == f"error: cannot write {out}: the folder {out.parent} does not exist\n"


def test_plot_of_an_unknown_image_type_lists_the_supported_ones(server, tmp_path):
    from matplotlib.backend_bases import FigureCanvasBase

    result = invoke(server, "plot", DONE, "-o", str(tmp_path / "c.xyz"))
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"error: cannot write {tmp_path / 'c.xyz'}: not an image type matplotlib writes")
    for ext in FigureCanvasBase.get_supported_filetypes():
        assert f".{ext}" in line, ext
    assert not (tmp_path / "c.xyz").exists() and server.requests == []


def test_plot_writes_other_image_types_by_their_extension(server, tmp_path):
    result = invoke(server, "plot", DONE, "-o", str(tmp_path / "curves.svg"))
    assert result.exit_code == 0, result.output
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:1000]


def test_plot_without_output_writes_job_png_here_and_says_the_absolute_path(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(server, "plot", DONE)
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{DONE}.png").read_bytes()[:4] == b"\x89PNG"
    assert result.output.strip() == f"wrote {tmp_path / f'{DONE}.png'}"


def test_weights_says_the_absolute_path_it_wrote(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(server, "weights", DONE, "-o", "w.npz")
    assert result.exit_code == 0, result.output
    assert f"to {tmp_path / 'w.npz'} (4 arrays" in result.output
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "w.npz").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ errors said once, exit codes


def test_a_missing_spec_file_is_said_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def never_called(request):
        raise AssertionError("a missing spec must not reach the server")

    result = invoke(never_called, "submit", "nonexist.yaml")
    assert result.exit_code == 2
    assert result.output == "error: nonexist.yaml: cannot read spec (No such file or directory)\n"


def transport_failure(error: type[httpx.TransportError]):
    def fail(request):
        raise error("[Errno 104] Connection reset by peer", request=request)

    return fail


def answer(status: int, detail: str):
    return lambda request: httpx.Response(status, json={"detail": detail})


@pytest.mark.parametrize(
    ("handler", "code", "message"),
    [
        (answer(404, "no job with id nope"), 1, "error: no job with id nope"),
        (answer(409, "job nope is still running"), 1, "error: job nope is still running"),
        (answer(401, "a bearer token is required"), 1, "error: a bearer token is required"),
        (answer(500, "database is locked"), 1, "error: database is locked"),
        (answer(422, "job spec rejected"), 2, "error: job spec rejected"),
        (transport_failure(httpx.ConnectError), 3, f"error: cannot reach polyak server at {URL}"),
        (transport_failure(httpx.ReadError), 3,
         f"error: GET {URL}/jobs/nope: connection to the polyak server failed"),
    ],
)
def test_exit_status_follows_the_convention(handler, code, message):
    result = invoke(handler, "--url", URL, "status", "nope")
    assert result.exit_code == code, result.output
    (line,) = error_lines(result)
    assert line.startswith(message)


def test_ctrl_c_exits_130_without_a_traceback():
    def interrupt(request):
        raise KeyboardInterrupt

    result = invoke(interrupt, "list")
    assert result.exit_code == 130
    assert result.output == "interrupted\n"


def test_help_documents_exit_codes_and_environment_variables():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for text in ("0    done", "1    the job failed or was cancelled", "2    bad input or usage",
                 "3    a server, Ray cluster or port that cannot be reached or used", "130  interrupted (Ctrl-C)",
                 "POLYAK_URL", "POLYAK_TOKEN"):
        assert text in result.output, text
    command_help = CliRunner().invoke(cli, ["list", "--help"]).output
    assert "POLYAK_URL" in command_help and "POLYAK_TOKEN" in command_help


def test_version_is_the_installed_package_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"polyak, version {version('polyak')}\n"


@pytest.mark.parametrize("before", [[], ["--url", "http://elsewhere:1", "--token", "other"]])
def test_url_and_token_after_the_command(server, before):
    result = invoke(server, *before, "list", "--url", URL, "--token", "s3cret")
    assert result.exit_code == 0, result.output
    assert (server.url, server.token) == (URL, "s3cret")
    assert server.requests[0].headers["authorization"] == "Bearer s3cret"


# ------------------------------------------------------------------ cancel, final line


def test_cancel_of_an_ended_job_is_refused(server):
    result = invoke(server, "cancel", DONE)
    assert result.exit_code == 1
    assert result.output == f"error: job {DONE} already ended (succeeded); nothing to cancel\n"
    assert [r.method for r in server.requests] == ["GET"]


@pytest.mark.parametrize(
    ("state", "reason", "error", "line"),
    [
        ("succeeded", "max_epochs", None, "job succeeded (max_epochs)"),
        ("succeeded", "weight_change", None, "job succeeded (weight_change)"),
        ("cancelled", "cancelled", None, "job cancelled"),
        ("failed", "diverged", "diverged at epoch 4", "job failed (diverged): diverged at epoch 4"),
        ("failed", "error", "node lost", "job failed: node lost"),
        ("failed", None, "no such file", "job failed: no such file"),
        ("stopped", "max_epochs", "stopped by the user", "job stopped (max_epochs): stopped by the user"),
        ("succeeded", None, None, "job succeeded"),
    ],
)
def test_final_line_says_the_state_and_why_naturally(state, reason, error, line):
    assert final_line(state, reason, error).plain == line


def test_final_line_takes_the_enums_too():
    assert final_line(JobState.CANCELLED, StopReason.CANCELLED).plain == "job cancelled"
    assert final_line(JobState.SUCCEEDED, StopReason.MAX_EPOCHS).plain == "job succeeded (max_epochs)"


# ------------------------------------------------------------------ follow, the live view


def test_follow_reattaches_to_a_job(server):
    result = invoke(server, "follow", DONE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "digits-mlp · heavy_ball lr=0.1 alpha=0.1"  # the header: the job's name and optimizer
    assert len([line for line in lines if line.startswith("epoch ")]) == MAX_EPOCHS
    assert lines[-1] == "job succeeded (max_epochs)"


def test_follow_of_a_failed_job_exits_1():
    server = Server(final_state=JobState.FAILED)
    assert invoke(server, "follow", DONE).exit_code == 1


def test_submit_follow_header_names_the_job(server, tmp_path):
    spec = tmp_path / "unnamed.yaml"
    spec.write_text("stopping:\n  max_epochs: 30\n")
    result = invoke(server, "submit", str(spec), "--follow")
    # no name in the spec: the file
    assert result.output.splitlines()[:2] == [QUEUED, f"{spec} · heavy_ball lr=0.1 alpha=0.1"]


def test_following_a_queued_job_says_it_waits(server, monkeypatch):
    queued = server.jobs[QUEUED].model_copy(update={"waiting_reason": "waiting for 2 free CPUs"})
    replay = Server.events

    def queued_first(self, job):
        events = replay(self, job)
        state = f"event: state\ndata: {queued.model_dump_json()}\n\n".encode()
        return httpx.Response(200, headers=events.headers, content=state + events.content)

    monkeypatch.setattr(Server, "events", queued_first)
    result = invoke(server, "follow", QUEUED)
    assert result.output.splitlines()[:2] == [
        "wine-sgd · heavy_ball lr=0.1 alpha=0.1", "queued (position 1): waiting for 2 free CPUs"]


def test_ctrl_c_while_following_says_how_to_reattach(server, monkeypatch):
    def interrupted(self, job):
        raise KeyboardInterrupt

    monkeypatch.setattr(Server, "events", interrupted)
    result = invoke(server, "follow", DONE)
    assert result.exit_code == 130
    assert f"`polyak follow {DONE}` re-attaches" in result.output
    assert f"`polyak cancel {DONE}` ends it" in result.output


def live_console(out: io.StringIO) -> Console:
    return Console(file=out, force_terminal=True, width=150, height=60)


def test_live_view_says_when_it_showed_only_the_last_epochs():
    history = [epoch_metrics(e) for e in range(1, 38)]
    out = io.StringIO()
    with TrainingDisplay(max_epochs=40, console=live_console(out), all_epochs="`polyak metrics J` lists all") as d:
        for m in history:
            d.update(m)
        d.finish(JobState.SUCCEEDED, StopReason.MAX_EPOCHS)
    assert "showing the last 10 of 37 epochs; `polyak metrics J` lists all" in out.getvalue()
    out = io.StringIO()
    with TrainingDisplay(max_epochs=40, console=live_console(out), all_epochs="`polyak metrics J` lists all") as d:
        for m in history[:10]:
            d.update(m)
        d.finish(JobState.SUCCEEDED, StopReason.MAX_EPOCHS)
    assert "showing the last" not in out.getvalue()


# ------------------------------------------------------------------ async jobs: staleness, dropped gradients


def async_epoch(epoch: int) -> EpochMetrics:
    return epoch_metrics(epoch).model_copy(
        update={"staleness_mean": 0.75 + epoch / 10, "staleness_max": 3, "dropped_gradients": epoch - 1}
    )


def test_async_epochs_show_staleness_and_dropped_gradients():
    m = async_epoch(2)
    assert "staleness=0.95/3  dropped=1" in compact_line(m, MAX_EPOCHS)
    assert "staleness" not in compact_line(HISTORY[1], MAX_EPOCHS)
    out = io.StringIO()
    Console(file=out, width=200).print(metrics_table([async_epoch(1), m]))
    header, *_, last = [line for line in out.getvalue().splitlines() if "│" in line or "┃" in line]
    assert header.split("┃")[-3:-1] == [" staleness ", " dropped "]
    assert last.split("│")[-3:-1] == ["    0.95/3 ", "       1 "]
    out = io.StringIO()
    Console(file=out, width=200).print(metrics_table(HISTORY[:2]))
    assert "staleness" not in out.getvalue() and "dropped" not in out.getvalue()


def test_plot_of_an_async_job_adds_a_staleness_panel(tmp_path):
    fig = _figure([async_epoch(e) for e in range(1, 6)], title="async")
    titles = {ax.get_title(): ax for ax in fig.axes}
    panel = titles["async staleness and dropped gradients"]
    assert {line.get_label() for line in panel.lines} >= {"staleness mean", "staleness max", "dropped gradients"}
    assert "async staleness and dropped gradients" not in {ax.get_title() for ax in _figure(HISTORY, None).axes}
    path = plot_metrics([async_epoch(e) for e in range(1, 6)], tmp_path / "async.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
