"""The base install is the SDK alone: a command whose extra is missing says which one to install (exit 2)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from click.testing import CliRunner

from polyak.cli import cli


@pytest.fixture
def without(monkeypatch):
    """Make the named top-level modules look uninstalled to the CLI's check."""
    hidden: set[str] = set()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in hidden else real(name, *a))
    return hidden.update


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_serve_without_the_server_extra(without, tmp_path):
    without({"fastapi"})
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path / "d"), "--port", "0"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("error: this needs fastapi,") and "pip install 'polyak[server]'" in line
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_training_on_ray_without_the_train_extra(without, tmp_path):
    without({"ray"})
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"data": {"source": "sklearn", "name": "iris"}, "model": {"layers": [4, 3]},
                                    "cluster": {"num_workers": 2}, "stopping": {"max_epochs": 1}}))
    result = CliRunner().invoke(cli, ["train", str(spec), "-o", str(tmp_path / "w.npz"), "--json"])
    assert result.exit_code == 2
    assert "this needs ray" in result.output and "pip install 'polyak[train]'" in result.output
    assert not (tmp_path / "w.npz").exists()


def test_sklearn_data_without_the_train_extra(without, tmp_path):
    without({"sklearn"})
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"data": {"source": "sklearn", "name": "iris"}, "model": {"layers": [4, 3]},
                                    "cluster": {"num_workers": 0}}))
    result = CliRunner().invoke(cli, ["train", str(spec), "-o", str(tmp_path / "w.npz")])
    assert result.exit_code == 2
    assert "this needs sklearn" in one_error_line(result)


def test_a_plot_without_the_plots_extra(without, tmp_path):
    without({"matplotlib"})
    result = CliRunner().invoke(cli, ["plot", "any-job", "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 2
    assert "pip install 'polyak[plots]'" in one_error_line(result)
