"""The polyak package as one folder, for Ray to ship to a cluster (``runtime_env={"py_modules": [...]}``).

An installed wheel is one folder already. An editable install of a checkout is not: its ``client/``,
``service/`` and ``workers/`` folders are mounted into the namespace by pyproject's ``package-dir``, so they
are copied once per process into a staging folder shaped like the wheel.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

MOUNTED = ("client", "service", "workers")  # pyproject.toml's package-dir: polyak.<name> -> <name>/
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


@functools.cache
def shippable_package() -> str:
    """A folder named ``polyak`` that holds the whole package, as this process imports it."""
    import polyak

    root = Path(polyak.__file__).parent
    mounted = {name: Path(find_spec(f"polyak.{name}").submodule_search_locations[0]) for name in MOUNTED}
    if all(path == root / name for name, path in mounted.items()):
        return str(root)
    stage = Path(tempfile.mkdtemp(prefix="polyak-ship-"))
    atexit.register(shutil.rmtree, stage, ignore_errors=True)
    shutil.copytree(root, stage / "polyak", ignore=_SKIP)
    for name, path in mounted.items():
        shutil.copytree(path, stage / "polyak" / name, ignore=_SKIP)
    return str(stage / "polyak")
