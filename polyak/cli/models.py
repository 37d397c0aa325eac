"""`polyak predict`, `evaluate` and `export`: a trained model's weights file on new data, no server needed.

DATA is read by the readers training uses (polyak/workers/readers): ``.npy`` (a 2-D table), ``.npz`` (arrays X
and, to evaluate, y), ``.csv`` (optionally under a header row of column names) or ``.parquet`` (a file or a
directory). ``predict`` takes features only; ``evaluate`` takes features and targets split as the job's were:
the weights file's stored spec names the target column(s) in ``data.target``, else they are the last
column(s) (``.npz``: y).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from rich.text import Text

from polyak.cli.app import (
    cli,
    make_console,
)
from polyak.client.files import check_output, write_output
from polyak.client.model import Model
from polyak.contract.errors import DataError, OutputError
from polyak.workers.readers import open_features, open_labelled
from polyak.workers.readers.source import Source


@cli.command()
@click.argument("weights", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--output", default=None, help="write the predictions to .npy or .csv; default: print them")
@click.option("--proba", is_flag=True, help="class probabilities (cross_entropy models) instead of class ids")
def predict(weights: Path, data: Path, output: str | None, proba: bool) -> None:
    """Predict with a weights file on DATA's raw features (the model applies its own standardization)."""
    if output is not None:
        check_output(output)
        if Path(output).suffix not in (".npy", ".csv"):
            raise OutputError(f"cannot write {output}: predictions are written as .npy or .csv")
    model = Model.load(weights)
    out = _predictions(model, open_features(_existing(data)), proba)
    if output is None:
        np.savetxt(click.get_text_stream("stdout"), out if out.ndim > 1 else out[:, None], fmt="%.8g", delimiter=",")
        return
    if output.endswith(".csv"):
        text = "\n".join(",".join(f"{v:.8g}" for v in np.atleast_1d(row)) for row in out) + "\n"
        where = write_output(output, text.encode())
    else:
        import io

        buffer = io.BytesIO()
        np.save(buffer, out)
        where = write_output(output, buffer.getvalue())
    make_console().print(Text(f"wrote {len(out):,} predictions {out.shape} to {where}"))


@cli.command()
@click.argument("weights", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print {loss, accuracy, n} as JSON")
def evaluate(weights: Path, data: Path, as_json: bool) -> None:
    """Score a weights file on DATA (features then targets, as for training): loss, accuracy, rows."""
    model = Model.load(weights)
    target = ((model.spec or {}).get("data") or {}).get("target")  # files without a spec: the last column(s)
    source = open_labelled(_existing(data), target, model.loss, model.n_outputs)
    score = model.evaluate(*source.read(np.arange(source.n)))
    if as_json:
        click.echo(json.dumps(score))
        return
    accuracy = "" if score["accuracy"] is None else f", accuracy {score['accuracy']:.4f}"
    make_console().print(Text(f"{data}: loss {score['loss']:.6g}{accuracy} on {score['n']:,} rows ({model.loss})"))


@cli.command()
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", required=True, help="the .onnx file to write (needs polyak[onnx])")
@click.option("--opset", type=click.IntRange(13), default=17, show_default=True, help="ONNX opset")
def export(weights: Path, onnx_path: str, opset: int) -> None:
    """Export a weights file as one ONNX graph: standardization, layers, and a softmax for classifiers."""
    check_output(onnx_path)
    model = Model.load(weights)
    where = model.to_onnx(onnx_path, opset=opset)
    make_console().print(Text(f"wrote {where}: input 'input' [N, {model.n_features}], opset {opset}"))


def _existing(data: Path) -> str:
    """DATA as the readers take it; one that is not there is bad input (exit 2), named in full."""
    if not data.exists():
        raise DataError(f"{data.absolute()}: no such file")
    return str(data)


def _predictions(model: Model, source: Source, proba: bool) -> np.ndarray:
    """The model's predictions (class ids, values, or probabilities) for every row of DATA, read a chunk at a
    time: the data is never held whole, only the predictions."""
    method = model.predict_proba if proba else model.predict
    parts = [method(X) for _, X, _ in source.chunks(np.arange(source.n))]
    return np.concatenate(parts) if parts else method(np.empty((0, source.n_features)))
