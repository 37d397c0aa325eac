"""The ``polyak`` command group, the exit status of every command, and what the commands share.

The group keeps ``url`` and ``token`` in ``ctx.obj`` (a command's own ``--url``/``--token`` overwrite them
there); an optional ``ctx.obj["client_factory"]`` (called as ``factory(url=..., token=...)``) lets tests hand
the commands a Client built on a mock transport.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, NoReturn

import click
from rich.console import Console

from polyak.client.files import check_output
from polyak.client.sdk import DEFAULT_URL, Client
from polyak.contract.errors import BadInput, OutputError, PolyakError, SpecError
from polyak.contract.spec import is_uri, parse_spec

EXIT_CODES = """\b
Exit status, the same for every command:
  0    done
  1    the job failed or was cancelled, or the server refused the request (no such job, a conflict, a wrong token)
  2    bad input or usage: a bad spec, a file that cannot be read or written, a bad option
  3    a server, Ray cluster or port that cannot be reached or used
  130  interrupted (Ctrl-C)
"""




class _Group(click.Group):
    """Turns every PolyakError into one red ``error:`` line and the exit status of EXIT_CODES, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PolyakError as e:
            _print_error(e)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:  # click's own handling would say "Aborted!" and exit 1
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(name="polyak", cls=_Group, epilog=EXIT_CODES)
@click.version_option(package_name="polyak", prog_name="polyak")
@click.option("--url", envvar="POLYAK_URL", default=DEFAULT_URL, show_default=True, show_envvar=True,
              help="polyak server URL")
@click.option("--token", envvar="POLYAK_TOKEN", default=None, show_envvar=True,
              help="bearer token, if the server wants one")
@click.pass_context
def cli(ctx: click.Context, url: str, token: str | None) -> None:
    """polyak: distributed minibatch SGD with heavy-ball momentum, as a job service.

    --url and --token may also follow the command (polyak list --url ...).
    """
    ctx.ensure_object(dict)
    ctx.obj["url"] = url
    ctx.obj["token"] = token


def server_options(command: Callable) -> Callable:
    """``--url``/``--token`` after the command as well (``polyak list --url ...``); given there, they win."""

    def keep(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)[param.name] = value

    command = click.option("--token", default=None, expose_value=False, callback=keep,
                           help="bearer token  [default: polyak --token, or env POLYAK_TOKEN]")(command)
    return click.option("--url", default=None, expose_value=False, callback=keep,
                        help="polyak server URL  [default: polyak --url, or env POLYAK_URL]")(command)


def require(extra: str, *modules: str) -> None:
    """BadInput naming the extra to install when a module this command needs is missing (the base install is
    the SDK alone: see pyproject's optional dependencies)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BadInput(f"this needs {', '.join(missing)}, which polyak's base install leaves out: "
                       f"pip install 'polyak[{extra}]' (or 'polyak[all]')")


def check_image_output(output: str) -> str:
    """An -o for a plot: an image type matplotlib writes, in a folder that exists (else exit 2); its type."""
    require("plots", "matplotlib")
    from polyak.client.plot import image_formats

    image_type = PurePath(output).suffix.lstrip(".").lower()
    if image_type not in image_formats():
        extensions = ", ".join(f".{ext}" for ext in image_formats())
        raise OutputError(f"cannot write {output}: not an image type matplotlib writes; use one of {extensions}")
    check_output(output)
    return image_type


def shown_path(where: str) -> str:
    """Where a file went: a local one by its absolute path, so it can be found whatever folder this ran in."""
    return where if is_uri(where) else str(Path(where).absolute())


def client_of(ctx: click.Context) -> Client:
    obj = ctx.obj
    factory = obj.get("client_factory", Client)
    return ctx.with_resource(factory(url=obj["url"], token=obj["token"]))


def make_console() -> Console:
    # Made per command so it writes to whatever stdout is current (click's test runner swaps it).
    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped to a file or a log there is no screen to fit: rich's 80 columns would truncate table cells.
        console.width = max(console.width, 200)
    return console


def _print_error(e: PolyakError) -> None:
    console = Console(stderr=True, highlight=False)
    console.print(f"error: {e.message}", style="red", markup=False, soft_wrap=True)
    if isinstance(e, SpecError):
        for err in e.errors:
            # A locally parsed spec already lists its field errors in the message, and a spec file that cannot
            # be read carries the message itself as its one error.
            if err["message"] not in e.message:
                console.print(f"  {err['field']}: {err['message']}", style="red", markup=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """One red ``error:`` line and the exit status of polyak's convention (see ``polyak --help``)."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def prepare_run(spec: Path, output: str | None, max_job_memory: int | None = None):
    """The spec and its data's shape, checked before Ray starts; a bad one exits 2 naming what is wrong, and so
    does one whose estimated memory is over ``max_job_memory`` (default: half the machine's), before any data is
    read."""
    from polyak.service.engine.memory import check_memory, default_limit
    from polyak.workers.data import prepare

    try:
        if output is not None:
            check_output(output)
        job_spec = parse_spec(spec)
        check_memory(job_spec, default_limit() if max_job_memory is None else max_job_memory)
        if job_spec.data.source != "file":
            require("train", "sklearn")  # scikit-learn's bundled datasets and its make_classification
        return job_spec, prepare(job_spec.data, job_spec.model)
    except SpecError as e:
        fail(e.message if str(spec) in e.message else f"{spec}: {e.message}")
    except PolyakError as e:
        fail(e.message)
    except ValueError as e:  # DataError, and generators' own complaints (sklearn's make_classification)
        fail(str(e))
