"""The graft command line: thin wrappers over the library.

graft finetune [hydra overrides]      e.g. graft finetune strategy=lora deepspeed=zero3
graft finetune --cfg                  print the composed config and exit
graft sweep [hydra overrides]         e.g. graft sweep sweep.num_trials=40 sweep.max_concurrent=4
graft report runs/<sweep-name>        report.md/html, plots and best.yaml of a sweep
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="graft",
    help="Transfer-learning fine-tuning on Ray with DeepSpeed ZeRO. Configs are Hydra overrides.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _root() -> None:
    """graft: fine-tune pretrained models on Ray (embedded local cluster by default)."""


Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides, e.g. model=tiny_llama strategy=lora train.lr=3e-4 +experiment=x",
        show_default=False,
    ),
]


def _compose(overrides: list[str] | None, config_name: str):  # type: ignore[no-untyped-def]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from jobs.config import compose

    try:
        return compose(overrides or [], config_name=config_name)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        err.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def finetune(
    overrides: Overrides = None,
    cfg: Annotated[
        bool, typer.Option("--cfg", help="Print the composed, validated config and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress bar.")] = False,
) -> None:
    """Fine-tune a model: an embedded local Ray by default, or cluster.address=... ."""
    from conf.schema import ConfigError
    from jobs import finetune as job
    from jobs.config import to_yaml

    config = _compose(overrides, "finetune")
    if cfg:
        typer.echo(to_yaml(config))
        return
    try:
        job.run(config, show_progress=not quiet)
    except (ConfigError, ConnectionError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def sweep(
    overrides: Overrides = None,
    cfg: Annotated[
        bool, typer.Option("--cfg", help="Print the composed, validated config and exit.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress lines.")] = False,
) -> None:
    """Sweep the transfer space with Optuna on Ray Tune (conf/sweep.yaml, conf/sweep/).
    Rerunning the same command resumes the sweep."""
    from conf.schema import ConfigError
    from jobs import sweep as job
    from jobs.config import to_yaml

    config = _compose(overrides, "sweep")
    if cfg:
        typer.echo(to_yaml(config))
        return
    try:
        job.run(config, show_progress=not quiet)
    except (ConfigError, ConnectionError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A sweep directory, runs/<sweep-name>.")],
    storage: Annotated[
        str | None,
        typer.Option(help="The study's storage URL, when it is not the one in sweep.json."),
    ] = None,
) -> None:
    """Write a sweep's report: report.md, report.html, PNG plots and best.yaml."""
    from conf.schema import ConfigError
    from jobs.report import write_report

    try:
        out = write_report(run, storage=storage)
    except (ConfigError, FileNotFoundError, KeyError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    typer.echo(f"{out / 'report.md'}\n{out / 'report.html'}\n{out / 'best.yaml'}")


if __name__ == "__main__":
    app()
