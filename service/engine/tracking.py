"""Experiment tracking: a job's parameters, every epoch's figures and stopping criteria, and its final model (the
weights file and its ONNX graph) logged to TensorBoard event files and/or an MLflow run, as the spec's
``tracking`` section asks. Every way a job runs goes through here (``polyak train``, the service, the
estimators), because ``train_job`` does. The writers are optional extras (``pip install 'polyak[tracking]'``).

TensorBoard: ``<tracking.tensorboard>/<job id>/`` holds the event file (one scalar per figure, step = epoch;
``criteria/<name>`` and ``criteria/<name>_threshold``; the spec as text) and, at the end, ``weights.npz`` and
``model.onnx``. MLflow: a run named by the job in experiment ``tracking.experiment``, the spec's fields as
parameters (dotted names), the figures as metrics (step = epoch), both files as artifacts, and the run's status
(FINISHED, FAILED or KILLED) at the end. A local folder or ``file:`` URI is MLflow's file store, which MLflow 3
keeps for compatibility only: polyak opts in to it for that run (``MLFLOW_ALLOW_FILE_STORE``).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from polyak.contract.errors import BadInput
from polyak.contract.onnx import Network, onnx_bytes
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobState

# EpochMetrics' figures that are numbers: each one a scalar / metric.
FIGURES = ("train_loss", "val_loss", "val_accuracy", "lr", "batch_size", "weight_norm", "weight_change",
           "grad_avg_norm", "grad_noise", "samples_per_second", "staleness_mean", "staleness_max",
           "dropped_gradients")


class Tracker(Protocol):
    def epoch(self, m: EpochMetrics) -> None: ...

    def finish(self, state: JobState, files: dict[str, bytes]) -> None: ...


def trackers_for(spec: JobSpec, job_id: str) -> list[Tracker]:
    """The trackers the spec's ``tracking`` section asks for, started (parameters logged)."""
    found: list[Tracker] = []
    if (spec.tracking.tensorboard or spec.tracking.mlflow) and find_spec("onnx") is None:
        raise BadInput("tracking logs the final model as ONNX too, which needs onnx: pip install 'polyak[tracking]'")
    if spec.tracking.tensorboard:
        found.append(TensorBoardTracker(Path(spec.tracking.tensorboard) / job_id, spec))
    if spec.tracking.mlflow:
        found.append(MLflowTracker(spec.tracking.mlflow, spec.tracking.experiment, job_id, spec))
    return found


def model_files(arrays: dict[str, np.ndarray], spec: JobSpec) -> dict[str, bytes]:
    """The final model as files: the weights file (``weights.npz``) and its ONNX graph (``model.onnx``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    L = len(spec.model.layers) - 1
    net = Network(tuple(spec.model.layers), spec.model.activation, spec.model.loss,
                  {k: arrays[k] for l in range(1, L + 1) for k in (f"W{l}", f"b{l}")},
                  arrays.get("x_mean"), arrays.get("x_std"), spec.model_dump(mode="json"),
                  f"polyak MLP {spec.model.layers}, trained by job {spec.name or ''}".strip())
    return {"weights.npz": buffer.getvalue(), "model.onnx": onnx_bytes(net)}


def flat_params(spec: JobSpec) -> dict[str, str]:
    """The spec's fields by dotted name (``optimizer.lr``), values as text; lists as JSON."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(value) if isinstance(value, list) else str(value)

    walk(spec.model_dump(mode="json"), "")
    return out


def _numbers(m: EpochMetrics) -> dict[str, float]:
    figures = {name: float(v) for name in FIGURES if (v := getattr(m, name, None)) is not None}
    for c in m.criteria:
        if c.value is not None:
            figures[f"criteria/{c.name}"] = float(c.value)
        if c.threshold is not None:
            figures[f"criteria/{c.name}_threshold"] = float(c.threshold)
    return {k: v for k, v in figures.items() if np.isfinite(v)}


class TensorBoardTracker:
    def __init__(self, folder: Path, spec: JobSpec):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise BadInput("tracking.tensorboard needs tensorboardX: pip install 'polyak[tracking]'") from None
        self.folder = folder
        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("spec", "```\n" + json.dumps(spec.model_dump(mode="json"), indent=2) + "\n```", 0)

    def epoch(self, m: EpochMetrics) -> None:
        for name, value in _numbers(m).items():
            self.writer.add_scalar(name, value, m.epoch)
        self.writer.flush()

    def finish(self, state: JobState, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            (self.folder / name).write_bytes(data)
        self.writer.add_text("state", state.value, 0)
        self.writer.close()


class MLflowTracker:
    _STATUS = {JobState.SUCCEEDED: "FINISHED", JobState.FAILED: "FAILED", JobState.CANCELLED: "KILLED"}

    def __init__(self, uri: str, experiment: str, job_id: str, spec: JobSpec):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise BadInput("tracking.mlflow needs MLflow: pip install 'polyak[tracking]'") from None
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, as asked
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=job_id,
                                             tags={"polyak.job_id": job_id}).info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(spec).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def epoch(self, m: EpochMetrics) -> None:
        from mlflow.entities import Metric

        now = int(m.elapsed_seconds * 1000)
        metrics = [Metric(name, value, now, m.epoch) for name, value in _numbers(m).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, state: JobState, files: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory(prefix="polyak-mlflow-") as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
                self.client.log_artifact(self.run_id, str(Path(folder, name)))
        self.client.set_terminated(self.run_id, self._STATUS.get(state, "FINISHED"))
