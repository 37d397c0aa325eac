"""The distribution as a user installs it: a wheel built from the checkout, installed into a fresh venv.

The venv gets the wheel alone (``--no-deps``); the dependencies come from the test's own environment through a
path entry, so nothing is downloaded and the checkout itself is never importable there.
"""

from __future__ import annotations

import email
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path, PurePosixPath

import httpx
import pytest
import yaml

from polyak.shipping import MOUNTED

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "polyak", *MOUNTED)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel setuptools builds from a copy of the checkout's sources (no build folders left in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    build = "from setuptools import build_meta; import sys; print(build_meta.build_wheel(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", build, str(tmp / "dist")], cwd=source, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "dist" / out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new venv holding the wheel; its python sees this environment's packages but no checkout."""
    root = tmp_path_factory.mktemp("venv") / "fresh"
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies, and nothing of polyak: this environment's editable install is a .pth hook, which a
    # plain path entry does not run.
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def run_in(fresh: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {"PATH": f"{fresh / 'bin'}:/usr/bin:/bin", "HOME": str(cwd), "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_claims_one_import_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = next(t for t in tops if t.endswith(".dist-info"))
    assert tops == {"polyak", dist_info}
    top_level = zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == ["polyak"]
    record = zipfile.ZipFile(wheel).read(f"{dist_info}/RECORD").decode().splitlines()
    assert {line.split("/")[0] for line in record} == {"polyak", dist_info}
    # Every package of the checkout is in the wheel (pyproject lists them), mounted where the namespace says.
    mounts = {"polyak": "polyak", **{folder: f"polyak/{folder}" for folder in MOUNTED}}
    packages = {(PurePosixPath(mounts[folder]) / init.relative_to(REPO / folder).as_posix()).as_posix()
                for folder in mounts for init in (REPO / folder).rglob("__init__.py")}
    assert packages <= set(names), sorted(packages - set(names))
    for module in ("polyak/client/sdk.py", "polyak/service/engine/trainer.py", "polyak/workers/mlp.py",
                   "polyak/contract/spec.py", "polyak/cli/app.py", "polyak/service/server/dashboard/index.html"):
        assert module in names


def test_the_base_install_is_the_sdk_and_each_extra_brings_its_part(wheel):
    dist_info = next(n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" in n)
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA"))
    requires = meta.get_all("Requires-Dist")
    base = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requires if "extra ==" not in r}
    assert base == {"numpy", "pydantic", "pyyaml", "httpx", "click", "rich"}

    def extra(name: str) -> set[str]:
        """The packages an extra brings, its references to other extras (polyak[a,b]) followed."""
        out = set()
        for r in requires:
            if f'extra == "{name}"' not in r:
                continue
            package = r.split(";")[0].split(">")[0].split("=")[0].strip()
            if package.startswith("polyak["):
                for other in package[len("polyak["):-1].split(","):
                    out |= extra(other)
            else:
                out.add(package)
        return out

    assert {"ray[default]", "threadpoolctl", "scikit-learn"} <= extra("train")
    assert {"fastapi", "uvicorn"} <= extra("server")
    assert "matplotlib" in extra("plots")
    assert extra("train") | extra("server") | extra("plots") | extra("parquet") | extra("onnx") <= extra("all")
    assert extra("all") <= extra("dev")


def test_the_installed_wheel_runs(fresh, tmp_path):
    version = run_in(fresh, str(fresh / "bin" / "polyak"), "--version", cwd=tmp_path)
    assert version.returncode == 0 and "polyak, version 0.1.0" in version.stdout, version.stderr

    where = run_in(fresh, str(fresh / "bin" / "python"), "-c",
                   "import polyak, sys; from polyak import Client, Job, Model; "
                   "assert 'client' not in sys.modules and 'service' not in sys.modules; print(polyak.__file__)",
                   cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(fresh)), where.stdout

    spec = yaml.safe_load((REPO / "examples" / "digits.yaml").read_text())
    spec["cluster"] = {"num_workers": 0}  # in this process: the wheel's own trainer, no Ray to start
    spec["stopping"] = {**spec.get("stopping", {}), "max_epochs": 2}
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(spec))
    trained = run_in(fresh, str(fresh / "bin" / "polyak"), "train", "digits.yaml", "-o", "w.npz", "--json",
                     cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    epochs = [line for line in trained.stdout.splitlines() if line.startswith("{")]
    assert len(epochs) == 2
    assert (tmp_path / "w.npz").stat().st_size > 0


def test_the_installed_wheel_serves_the_dashboard_and_its_licences(wheel, fresh, tmp_path):
    """``pip install`` (no -e) must serve the page: every file of dashboard/ and Swagger UI's licence are in the
    wheel, and `polyak serve` from the fresh venv answers / and the vendored chart library."""
    names = set(zipfile.ZipFile(wheel).namelist())
    dashboard = REPO / "service" / "server" / "dashboard"
    expected = {f"polyak/service/server/dashboard/{p.relative_to(dashboard).as_posix()}"
                for p in dashboard.rglob("*") if p.is_file()}
    assert {"polyak/service/server/dashboard/index.html", "polyak/service/server/dashboard/vendor/uplot/LICENSE",
            "polyak/service/server/dashboard/vendor/uplot/uPlot.iife.min.js"} <= expected
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert "polyak/service/server/static/swagger-ui/LICENSE" in names
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": f"{fresh / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen([str(fresh / "bin" / "polyak"), "serve", "--port", str(port), "--data-dir",
                               str(tmp_path / "data")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        page = None
        deadline = time.monotonic() + 60
        while page is None and time.monotonic() < deadline:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            except httpx.TransportError:
                time.sleep(0.1)
        assert page is not None and page.status_code == 200
        assert '<script type="module" src="dashboard/app.js">' in page.text
        chart = httpx.get(f"http://127.0.0.1:{port}/dashboard/vendor/uplot/uPlot.iife.min.js", timeout=5)
        assert chart.status_code == 200 and "uPlot" in chart.text
    finally:
        server.terminate()
        server.wait(30)
