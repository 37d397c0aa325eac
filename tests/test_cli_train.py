"""`polyak train` as a user runs it: a real process, its exit status, its output and its weights file."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from polyak.contract.network import from_dict, to_dict
from polyak.contract.spec import JobSpec, parse_spec
from polyak.contract.wire import EpochMetrics
from polyak.service.engine.trainer import initial_weights

IRIS = {
    "model": {"layers": [4, 8, 3], "activation": "tanh", "seed": 1},
    "data": {"source": "sklearn", "name": "iris", "standardize": True, "validation_fraction": 0.2},
    "optimizer": {"method": "heavy_ball", "lr": 0.5, "alpha": 0.5},
    "batch": {"size": 16},
    "stopping": {"max_epochs": 4},
    "cluster": {"num_workers": 0, "device": "cpu"},
}


def write_spec(tmp_path, spec, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def polyak(*args, timeout=120, env=None):
    return subprocess.run(
        [sys.executable, "-m", "polyak", "train", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env=env,
    )


def with_(section, **values):
    return {**IRIS, section: {**IRIS[section], **values}}


def test_train_writes_weights_and_streams_json_metrics(tmp_path):
    out = tmp_path / "w.npz"
    proc = polyak(write_spec(tmp_path, IRIS), "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = [EpochMetrics.model_validate_json(line) for line in proc.stdout.splitlines()]
    assert [m.epoch for m in lines] == [1, 2, 3, 4]
    assert lines[-1].stop == "max_epochs" and lines[-1].val_accuracy is not None
    with np.load(out, allow_pickle=False) as w:
        shapes = {k: w[k].shape for k in w.files}
        spec = JobSpec.model_validate_json(str(w["spec"]))
    # The file is a model of raw inputs: layers, the spec it was trained with and (standardize: true) the
    # training rows' statistics.
    assert shapes == {"W1": (8, 4), "b1": (8,), "W2": (3, 8), "b2": (3,), "x_mean": (4,), "x_std": (4,), "spec": ()}
    assert spec == parse_spec(write_spec(tmp_path, IRIS)) and spec.data.standardize
    assert json.loads(proc.stderr.strip().splitlines()[-1])["state"] == "succeeded"


def test_train_on_a_local_ray_with_two_workers(tmp_path):
    spec = with_("cluster", num_workers=2, mode="sync")
    # Ray announces the token authentication it turns on by default only while RAY_AUTH_MODE is unset.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = polyak(write_spec(tmp_path, spec), "-o", tmp_path / "w.npz", "--json", timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("starting a local Ray for 2 worker(s) ...\n"), proc.stderr
    assert "Token authentication" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    reference = polyak(write_spec(tmp_path, IRIS, "local.yaml"), "-o", tmp_path / "ref.npz")
    assert reference.returncode == 0
    with np.load(tmp_path / "w.npz") as a, np.load(tmp_path / "ref.npz") as b:
        assert str(a["spec"]) != str(b["spec"])  # num_workers differs
        for k in ("W1", "b1", "W2", "b2", "x_mean", "x_std"):  # float32, summed by two workers: up to rounding
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


def one_line_error(proc) -> str:
    assert proc.returncode not in (0, None)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_a_bad_spec_is_one_line_naming_the_field(tmp_path):
    line = one_line_error(polyak(write_spec(tmp_path, with_("stopping", max_epochs=-1))))
    assert "stopping.max_epochs" in line and ">= 0" in line
    line = one_line_error(polyak(write_spec(tmp_path, with_("optimizer", momentum=0.9))))
    assert "optimizer.momentum" in line and "unknown key" in line


def test_bad_data_is_one_line_naming_the_file_and_the_problem(tmp_path):
    data = tmp_path / "data.npz"
    X = np.ones((10, 4))
    X[3, 2] = np.nan
    np.savez(data, X=X, y=np.zeros(10))
    spec = {**IRIS, "data": {"source": "file", "path": str(data)}}
    line = one_line_error(polyak(write_spec(tmp_path, spec)))
    assert str(data) in line and "NaN" in line
    spec["model"] = {**IRIS["model"], "layers": [5, 8, 3]}
    np.savez(data, X=np.ones((10, 4)), y=np.zeros(10))
    line = one_line_error(polyak(write_spec(tmp_path, spec)))
    assert "layers[0] = 5" in line and "4 features" in line


def test_divergence_is_a_failure_naming_epoch_and_step(tmp_path):
    spec = {**IRIS, "model": {"layers": [10, 1], "loss": "mse"}, "data": {"source": "sklearn", "name": "diabetes"},
            "optimizer": {"method": "sgd", "lr": 10.0}}
    out = tmp_path / "w.npz"
    line = one_line_error(polyak(write_spec(tmp_path, spec), "-o", out))
    assert "diverged at epoch 1, step" in line
    # The last finite weights are still written: diverging in epoch 1, those are the initial ones.
    W0 = to_dict(initial_weights(parse_spec(spec)), [10, 1])
    with np.load(out) as w:
        for name in ("W1", "b1"):
            np.testing.assert_array_equal(w[name], W0[name])


def test_ctrl_c_cancels_and_still_writes_the_last_weights(tmp_path):
    # digits one sample a step: ~0.1 s an epoch, so the cancel lands mid-epoch on all but an overloaded machine
    spec = {**IRIS, "model": {**IRIS["model"], "layers": [64, 16, 10]}, "data": {**IRIS["data"], "name": "digits"},
            "optimizer": {**IRIS["optimizer"], "lr": 0.01}, "batch": {"size": 1}, "stopping": {"max_epochs": 100000}}
    out = tmp_path / "w.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyak", "train", str(write_spec(tmp_path, spec)), "-o", str(out), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = [proc.stdout.readline(), proc.stdout.readline()]  # training is under way
    first, second = (EpochMetrics.model_validate_json(line) for line in lines)
    time.sleep((second.elapsed_seconds - first.elapsed_seconds) / 2)  # aim for the middle of epoch 3
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    metrics = [EpochMetrics.model_validate_json(line) for line in lines + stdout.splitlines()]
    assert [m.epoch for m in metrics] == list(range(1, len(metrics) + 1))
    last = metrics[-1]
    # A cancel mid-epoch reports the part it trained as a last, cancelled epoch; one between epochs adds none.
    assert last.stop == (None if last.samples_seen == metrics[0].samples_seen * last.epoch else "cancelled")
    assert json.loads(stderr.strip().splitlines()[-1])["state"] == "cancelled"
    assert "Traceback" not in stderr and "cancelling at the next step" in stderr
    with np.load(out) as w:
        assert set(w.files) == {"W1", "b1", "W2", "b2", "x_mean", "x_std", "spec"}
        W = from_dict(w, [64, 16, 10], np.float64)
    assert np.linalg.norm(W) == pytest.approx(last.weight_norm, rel=1e-12)  # the weights the last line reports


DIVERGING = {**IRIS, "model": {"layers": [10, 1], "loss": "mse"}, "data": {"source": "sklearn", "name": "diabetes"},
             "optimizer": {"method": "sgd", "lr": 10.0}}


def test_divergence_is_said_once_without_numpy_warnings(tmp_path):
    spec = write_spec(tmp_path, DIVERGING)
    proc = polyak(spec, "-o", tmp_path / "w.npz")
    line = one_line_error(proc)
    assert proc.returncode == 1
    reason = line.removeprefix("error: ")
    assert (proc.stdout + proc.stderr).count(reason) == 1
    assert proc.stdout.splitlines()[0].startswith(f"{spec} · ")  # the header: no name in the spec, so its file
    assert proc.stdout.splitlines()[-1] == "job failed (diverged)"
    assert "Warning" not in proc.stderr


def test_divergence_in_json_mode_is_one_error_line_without_numpy_warnings(tmp_path):
    proc = polyak(write_spec(tmp_path, DIVERGING), "-o", tmp_path / "w.npz", "--json")
    line = one_line_error(proc)
    assert proc.returncode == 1 and "Warning" not in proc.stderr
    summary = json.loads(proc.stderr.splitlines()[-2])  # the machine-readable record carries the same error
    assert (summary["state"], f"error: {summary['error']}") == ("failed", line)


def test_the_header_is_the_jobs_name(tmp_path):
    proc = polyak(write_spec(tmp_path, {**IRIS, "name": "iris-tanh"}), "-o", tmp_path / "w.npz")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "iris-tanh · heavy_ball lr=0.5 alpha=0.5"


def screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``, scrolled-off ones included: enough of VT100 for rich's Live
    (cursor up, erase line, carriage return; colours ignored)."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.|\n", raw):
        if token.startswith("\x1b["):
            if token[-1] == "A":
                row = max(0, row - int(token[2:-1] or 1))
            elif token[-1] == "K":
                rows[row] = rows[row][:col] if token[2:-1] in ("", "0") else ""
        elif token == "\r":
            col = 0
        elif token == "\n":  # a terminal's onlcr: a newline also returns the carriage
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token >= " ":
            line = rows[row].ljust(col)
            rows[row] = line[:col] + token + line[col + 1:]
            col += 1
    return rows


def read_until(fd: int, raw: bytearray, done, deadline: float) -> None:
    while not done(raw) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            raw += chunk


def test_ctrl_c_on_a_terminal_leaves_one_epoch_bar(tmp_path):
    """The live view on a real terminal: Ctrl-C cancels, and the last frame stays on screen once. A note
    written past the live frame (to stderr, as the cancel note once was) left the frame's top line, the epoch
    bar, behind as a second copy."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "LINES": "80", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyak", "train", str(write_spec(tmp_path, with_("stopping", max_epochs=100000))),
         "-o", str(tmp_path / "w.npz")], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env,
    )
    os.close(follower)
    raw = bytearray()
    try:
        read_until(leader, raw, lambda r: b"/100000" in r, time.monotonic() + 60)  # the live view is up
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        read_until(leader, raw, lambda r: False, time.monotonic() + 60)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        os.close(leader)
    rows = screen(raw.decode(errors="replace"))
    assert len([row for row in rows if row.startswith("epoch ") and "/100000" in row]) == 1, "\n".join(rows)
    assert sum(row.startswith("┏") for row in rows) == 2  # the metrics and the criteria table, once each
    assert "cancelling at the next step (Ctrl-C again to abort)" in rows
    assert "job cancelled" in rows


def test_serve_on_a_busy_port_exits_3_before_starting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "polyak", "serve", "--port", str(port), "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 3
    assert proc.stderr == (f"error: cannot listen on 127.0.0.1:{port}: address already in use "
                           "(another polyak serve? pick --port)\n")
    assert not (tmp_path / "data").exists()  # nothing was started, nothing was created


def test_only_rays_no_news_is_dropped():
    from polyak.cli.train import _quiet_ray

    _quiet_ray()
    banner = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    off_thread = "SIGTERM handler is not set because current thread is not the main thread."
    said = [
        ("ray._private.authentication.authentication_token_setup", logging.WARNING, banner),
        ("ray._private.authentication.authentication_token_setup", logging.WARNING, "Token authentication is disabled"),
        ("ray._private.authentication.authentication_token_setup", logging.ERROR, banner),
        ("ray._private.worker", logging.WARNING, off_thread),
        ("ray._private.worker", logging.WARNING, "Failed to connect to the GCS server"),
    ]
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.levelno, record.getMessage()))
    for name in {name for name, _, _ in said}:
        logging.getLogger(name).addHandler(handler)
    try:
        for name, level, message in said:
            logging.getLogger(name).log(level, message)
    finally:
        for name in {name for name, _, _ in said}:
            logging.getLogger(name).removeHandler(handler)
    assert seen == [said[1], said[2], said[4]]
