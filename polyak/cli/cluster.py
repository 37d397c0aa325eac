"""`polyak ray-submit`: one spec as a Ray job on a cluster, without the service."""

from __future__ import annotations

from pathlib import Path

import click
from rich.text import Text

from polyak.cli.app import (
    cli,
    make_console,
    shown_path,
)
from polyak.client.display import TrainingDisplay
from polyak.client.files import check_output, write_output
from polyak.contract.errors import PolyakError
from polyak.contract.spec import parse_spec


@cli.command(name="ray-submit")
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--address", envvar="RAY_API_SERVER_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
              help="the Ray cluster's dashboard  [env: RAY_API_SERVER_ADDRESS]")
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=".",
              show_default=True, help="uploaded as the job's working directory; must contain SPEC")
@click.option("--runtime-env", "runtime_env_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="runtime_env YAML/JSON, e.g. deploy/runtime_env.yaml, instead of the default")
@click.option("--follow", is_flag=True, help="show each epoch's metrics until the job ends")
@click.option("-o", "--output", default=None,
              help="wait for the job and write its final weights here (.npz, on this machine; or a URI)")
def ray_submit(spec: Path, address: str, working_dir: Path, runtime_env_file: Path | None, follow: bool,
               output: str | None) -> None:
    """Run SPEC as a Ray job (`python -m polyak train`) on a cluster, without the service.

    With token authentication on the cluster, set RAY_AUTH_MODE=token here too: Ray then sends the
    token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
    """
    from polyak.client import ray_job

    runtime_env = None
    if runtime_env_file is not None:
        import yaml

        try:
            runtime_env = yaml.safe_load(runtime_env_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PolyakError(f"{runtime_env_file}: cannot read runtime_env: {e}") from None
        if not isinstance(runtime_env, dict):
            raise PolyakError(f"{runtime_env_file}: a runtime_env must be a mapping")
    job_spec = parse_spec(spec)
    if output is not None:
        check_output(output)
    job_id = ray_job.submit_spec(address, spec, working_dir, runtime_env)
    click.echo(job_id)
    if not follow and output is None:
        return
    last, failed = None, None
    try:
        with TrainingDisplay(max_epochs=job_spec.stopping.max_epochs, console=make_console()) as display:
            try:
                for m in ray_job.follow(address, job_id):
                    last = m
                    display.update(m)
            except ray_job.RayJobFailed as e:
                display.finish(e.status.lower(), last.stop if last else None, e.message)
                failed = e
            else:
                display.finish("succeeded", last.stop if last else None)
    except KeyboardInterrupt:
        make_console().print(Text(f"stopped following {job_id}; it runs on (`ray job stop {job_id}` ends it)"))
        raise click.exceptions.Exit(130) from None
    if output is not None and (failed is None or last is not None):  # a failed job keeps its last weights
        where = write_output(output, ray_job.fetch_weights(address, job_id))
        make_console().print(Text(f"wrote the weights of ray job {job_id} to {shown_path(where)}"), soft_wrap=True)
    if failed is not None:
        raise click.exceptions.Exit(1)
