"""`polyak predict`, `evaluate` and `export`: a trained model's weights file on new data, no server needed.

DATA is laid out as for training: ``.npy`` (a 2-D table), ``.npz`` (arrays X and, to evaluate, y), ``.csv``
(a header row of names is skipped) or ``.parquet``. ``predict`` takes features only; ``evaluate`` takes the
features then the target column(s), as the job trained on them (``.npz``: X and y).
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
from polyak.contract.errors import PolyakError


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
            raise PolyakError(f"-o {output}: predictions are written as .npy or .csv")
    model = Model.load(weights)
    X, _ = read_data(data)
    out = model.predict_proba(X) if proba else model.predict(X)
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
    n_targets = 1 if model.loss == "cross_entropy" else model.n_outputs
    X, y = read_data(data, n_targets)
    score = model.evaluate(X, y)
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


def read_data(path: Path, n_targets: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) from DATA; y only when ``n_targets`` is given (the last column(s) of a table, or an .npz's y)."""
    if not path.is_file():
        raise PolyakError(f"{path.absolute()}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "X" not in f:
                    raise PolyakError(f"{path}: an .npz needs an array X (it holds: {', '.join(f.files)})")
                if n_targets is not None and "y" not in f:
                    raise PolyakError(f"{path}: to evaluate, an .npz needs an array y beside X")
                return f["X"], (f["y"] if n_targets is not None else None)
        table = _table(path)
    except PolyakError:
        raise
    except Exception as e:  # numpy's and pyarrow's many kinds of unreadable file
        raise PolyakError(f"{path}: cannot read data ({type(e).__name__}: {e})") from None
    if table.ndim != 2:
        raise PolyakError(f"{path}: expected a 2-D table, got shape {table.shape}")
    if n_targets is None:
        return table, None
    if table.shape[1] <= n_targets:
        raise PolyakError(f"{path}: {table.shape[1]} column(s) cannot be features then {n_targets} target(s)")
    y = table[:, -n_targets:]
    return table[:, :-n_targets], (y[:, 0] if n_targets == 1 else y)


def _table(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)  # the model reads it a chunk at a time
    if path.suffix == ".csv":
        try:
            return np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:  # a header row of column names
            return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PolyakError(f"{path}: reading .parquet needs pyarrow (pip install 'polyak[parquet]')") from None
        table = pq.read_table(path)
        return np.column_stack([c.to_numpy(zero_copy_only=False) for c in table.columns]).astype(np.float64)
    raise PolyakError(f"{path}: unsupported file type {path.suffix!r}; use .npy, .npz, .csv or .parquet")
