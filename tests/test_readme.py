"""README.md stays true: the spec reference is the model's, the mapped functions exist, examples parse."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

from polyak.contract.spec import parse_spec, spec_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_spec_reference_is_generated_from_the_model():
    block = README.split("<!-- spec-reference:start -->\n", 1)[1].split("<!-- spec-reference:end -->", 1)[0]
    assert block == spec_reference(), "README's spec reference is stale: paste client.spec.spec_reference()"


def test_every_spec_field_is_in_the_reference():
    fields = set(re.findall(r"^\| `([a-z_.0-9]+)` \|", spec_reference(), re.M))
    assert {"model.layers", "optimizer.alpha", "stopping.grad_tol", "cluster.max_staleness"} <= fields
    assert len(fields) == 51


def test_ci_extracts_the_two_commands_from_the_readme():
    script = (ROOT / ".ci" / "run").read_text()
    extract = script.split("extract() {", 1)[1].split("\n}\n", 1)[0]
    for name, must in (("example", "polyak train examples/"), ("tests", "pytest")):
        out = subprocess.run(
            ["bash", "-c", f"extract() {{{extract}\n}}\nextract {name}"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        assert out and must in out and out in README


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_specs(path):
    parse_spec(path)


def test_every_function_the_lecture_table_names_exists():
    section = README.split("## The lecture, mapped to code", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for module_path, names in re.findall(r"`([a-z_/]+\.py): ([^`]+)`", section):
        dotted = module_path.removesuffix(".py").replace("/", ".")
        module = importlib.import_module(dotted if dotted.startswith("polyak.") else f"polyak.{dotted}")
        for name in names.split(","):
            obj = module
            for part in name.strip().split("."):
                obj = getattr(obj, part)
            checked += 1
    assert checked >= 15
