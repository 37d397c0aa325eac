"""client/files.py: one behaviour for every -o, and URIs; `polyak train -o` uses it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from polyak.client.files import check_output, npz_bytes, write_output
from polyak.contract.errors import PolyakError

IRIS = {
    "model": {"layers": [4, 8, 3], "activation": "tanh", "seed": 1},
    "data": {"source": "sklearn", "name": "iris", "standardize": True},
    "stopping": {"max_epochs": 2},
    "cluster": {"num_workers": 0, "device": "cpu"},
}


def test_a_file_is_written_whole_with_the_usual_mode(tmp_path):
    target = tmp_path / "w.npz"
    assert write_output(target, npz_bytes({"a": np.arange(3)})) == str(target)
    with np.load(target, allow_pickle=False) as f:
        assert list(f["a"]) == [0, 1, 2]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]  # no temporary file left behind


def test_a_missing_folder_or_a_folder_as_target_is_refused(tmp_path):
    with pytest.raises(PolyakError, match=f"the folder {tmp_path / 'no'} does not exist"):
        check_output(tmp_path / "no" / "w.npz")
    with pytest.raises(PolyakError, match="it is a folder"):
        write_output(tmp_path, b"x")
    assert not (tmp_path / "no").exists()


def test_a_file_uri_goes_through_pyarrow(tmp_path):
    target = tmp_path / "w.npz"
    assert write_output(target.as_uri(), b"payload") == target.as_uri()
    assert target.read_bytes() == b"payload"
    with pytest.raises(PolyakError, match="cannot write nosuchscheme://x"):
        write_output("nosuchscheme://x/w.npz", b"payload")


def test_train_writes_to_a_uri_and_refuses_a_missing_folder(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(IRIS))

    def train(*args):
        return subprocess.run([sys.executable, "-m", "polyak", "train", str(spec), *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    target = tmp_path / "shared" / "w.npz"
    target.parent.mkdir()
    proc = train("-o", target.as_uri(), "--json")
    assert proc.returncode == 0, proc.stderr
    assert f"weights written to {target.as_uri()}" in proc.stderr
    with np.load(target, allow_pickle=False) as w:
        assert w["W1"].shape == (8, 4)
    missing = tmp_path / "nowhere" / "w.npz"
    proc = train("-o", missing)
    assert proc.returncode == 2 and not missing.parent.exists()
    assert proc.stderr.strip() == f"error: cannot write {missing}: the folder {missing.parent} does not exist"
