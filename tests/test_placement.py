"""Joining a Ray cluster (service/engine/placement.py): a refusal is told apart by the exception Ray raises, never
by its text, and becomes one line saying what to do. ray.init is replaced here: no Ray starts."""

from __future__ import annotations

import os

import pytest
import ray
from ray.exceptions import AuthenticationError

import polyak.shipping
from polyak.contract.errors import RAY_AUTH_HINT
from polyak.service.engine.placement import connect
from polyak.workers.readers import DATA_ROOTS, confine_data

ADDRESS = "10.0.0.1:6379"


@pytest.fixture
def joining(monkeypatch):
    """connect() to ADDRESS from outside a Ray job, with no Ray running and the package staged at /staged/polyak."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(polyak.shipping, "shippable_package", lambda: "/staged/polyak")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return monkeypatch


@pytest.fixture
def refused(joining):
    """refused(error): connect() to ADDRESS where ray.init raises ``error``; returns what connect raised."""
    monkeypatch = joining
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv(DATA_ROOTS, raising=False)

    def attempt(error: Exception) -> Exception:
        def init(**kwargs):
            assert kwargs["address"] == ADDRESS and kwargs["runtime_env"] == {"py_modules": ["/staged/polyak"]}
            raise error

        monkeypatch.setattr(ray, "init", init)
        with pytest.raises(Exception) as caught:
            connect(ADDRESS)
        return caught.value

    return attempt


def test_an_authentication_error_says_to_send_the_token_in_one_line(refused):
    error = refused(AuthenticationError("Authentication required:\n  no token was sent"))
    assert type(error) is ConnectionError and "\n" not in str(error)
    # Ray appends a note of its own to the message; it is kept, cut to 200 characters
    assert str(error).startswith(f"the Ray cluster at {ADDRESS} refused us (Authentication required: no token was sent")
    assert str(error).endswith(f"): {RAY_AUTH_HINT}")


def test_a_connection_error_without_token_mode_names_the_token_as_a_likely_cause(refused):
    error = refused(ConnectionError("Could not find any running Ray instance.\nPlease specify one."))
    assert type(error) is ConnectionError and "\n" not in str(error)
    assert str(error) == (f"cannot connect to the Ray cluster at {ADDRESS} (Could not find any running Ray instance. "
                          f"Please specify one.); a cluster started with `ray start` wants a token: {RAY_AUTH_HINT}")


def test_with_token_mode_on_a_connection_error_is_ray_own(refused, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    original = ConnectionError("Could not find any running Ray instance.")
    assert refused(original) is original


def test_an_error_is_classified_by_its_type_not_its_text(refused):
    """A message that talks of authentication is no AuthenticationError: it passes through untouched."""
    original = RuntimeError("authentication token mismatch in the GCS")
    assert refused(original) is original


def test_a_joined_cluster_gets_the_data_roots_this_process_is_confined_to(joining, tmp_path):
    """polyak serve --data-root confines this process; a local Ray inherits the environment, a running cluster's
    workers get the roots through the job's runtime_env (their check where a file is opened needs them)."""
    monkeypatch = joining
    monkeypatch.setenv(DATA_ROOTS, "")  # restored after the test: confine_data sets the process's environment
    confine_data([tmp_path / "a", tmp_path / "b"])
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    connect(ADDRESS)
    roots = os.pathsep.join(str((tmp_path / name).resolve()) for name in ("a", "b"))
    assert seen["runtime_env"] == {"py_modules": ["/staged/polyak"], "env_vars": {DATA_ROOTS: roots}}
