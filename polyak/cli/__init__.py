"""The ``polyak`` command: one click group (``app``) and one module per command group.

    jobs      submit, resubmit, follow, list, status, metrics, cancel, weights, plot   (a polyak server)
    train     train (one job, no service), serve (the job service)
    tuning    sweep, compare, lr-find
    models    predict, evaluate, export                                               (a weights file)
    cluster   ray-submit                                                              (a Ray cluster)
"""

from polyak.cli import cluster, jobs, models, train, tuning  # noqa: F401  (each registers its commands)
from polyak.cli.app import cli


def main() -> None:
    cli(prog_name="polyak")
