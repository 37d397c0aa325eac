"""The engine interface (service/engine/engine.py): every engine offers what the trainer calls, with the
protocol's signatures, and the epoch's figures hold exactly what the trainer reads. No Ray is started here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import numpy as np
import pytest

from polyak.service.engine import trainer
from polyak.service.engine.async_engine import AsyncRayEngine
from polyak.service.engine.engine import Engine, EpochFigures, TrainerDrivenEngine, WorkerDrivenEngine
from polyak.service.engine.local_engine import LocalEngine
from polyak.service.engine.sync_engine import SyncRayEngine
from polyak.workers.data import prepare

ENGINES = {LocalEngine: TrainerDrivenEngine, SyncRayEngine: TrainerDrivenEngine, AsyncRayEngine: WorkerDrivenEngine}


def protocol_members(protocol) -> tuple[set[str], dict[str, inspect.Signature]]:
    """(attribute names, method name -> signature) the protocol and the protocols it extends declare."""
    attributes, methods = set(), {}
    for cls in reversed(protocol.__mro__):
        if cls in (Engine, TrainerDrivenEngine, WorkerDrivenEngine):
            attributes |= set(cls.__dict__.get("__annotations__", {}))
            methods |= {name: inspect.signature(f) for name, f in vars(cls).items()
                        if inspect.isfunction(f) and not name.startswith("_")}
    return attributes, methods


def test_the_protocols_declare_what_the_trainer_calls():
    attributes, methods = protocol_members(TrainerDrivenEngine)
    assert attributes == {"drives_steps", "recoverable", "fatal"}
    assert set(methods) == {"describe", "end_epoch", "weights", "evaluate", "checkpoint", "restore", "recover",
                            "close", "step"}
    assert set(protocol_members(WorkerDrivenEngine)[1]) - set(methods) == {"run_epoch"}


@pytest.mark.parametrize("engine", list(ENGINES), ids=lambda c: c.__name__)
def test_each_engine_has_every_member_of_its_protocol_with_the_same_signature(engine):
    protocol = ENGINES[engine]
    attributes, methods = protocol_members(protocol)
    assert all(hasattr(engine, name) for name in attributes)
    assert engine.drives_steps is (protocol is WorkerDrivenEngine)
    for name, wanted in methods.items():
        have = inspect.signature(getattr(engine, name))
        assert list(have.parameters) == list(wanted.parameters), f"{engine.__name__}.{name}{have} != {wanted}"
        assert have.return_annotation == wanted.return_annotation, f"{engine.__name__}.{name} returns {have}"
    assert all(issubclass(e, Exception) for e in (*engine.recoverable, *engine.fatal))


def test_the_figures_hold_exactly_what_the_trainer_reads():
    """Every field of EpochFigures is read by the trainer, and the trainer reads no other (by its syntax tree)."""
    tree = ast.parse(Path(trainer.__file__).read_text())
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name | ast.Attribute)
            and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr) == "figures"}
    assert read == {f.name for f in dataclasses.fields(EpochFigures)}
    hints = typing.get_type_hints(EpochFigures)
    assert hints["step_losses"] is np.ndarray and hints["samples"] is int and hints["step"] is int


def test_local_engine_reports_an_epochs_figures(make_spec):
    """Two steps of plain SGD on iris: the figures are the steps' own losses, rows, t and eta."""
    spec = make_spec({"optimizer": {"method": "sgd", "lr": 0.1}, "cluster": {"dtype": "float64"}})
    info = prepare(spec.data, spec.model)
    engine = LocalEngine(spec, info, trainer.initial_weights(spec))
    losses = []
    for batch in (np.arange(10), np.arange(10, 30)):
        rows = engine.position[batch]
        losses.append(engine.mlp.loss_and_grad(engine.core.state.W, engine.X[rows], engine.y[rows])[1] / len(batch))
        engine.step(batch)
    figures = engine.end_epoch()
    assert isinstance(figures, EpochFigures)
    np.testing.assert_allclose(figures.step_losses, losses, rtol=1e-12)
    assert (figures.samples, figures.step, figures.last_lr) == (30, 2, 0.1)
    assert figures.staleness_mean is figures.staleness_max is figures.dropped_gradients is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        figures.step = 3
    engine.recover()
    np.testing.assert_array_equal(engine.weights(), trainer.initial_weights(spec))
    assert engine.end_epoch().step == 0
