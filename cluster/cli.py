"""The graft command line: thin wrappers over the library.

graft finetune [hydra overrides]      e.g. graft finetune strategy=lora deepspeed=zero3
graft finetune --cfg                  print the composed config and exit
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="graft",
    help="Transfer-learning fine-tuning on Ray with DeepSpeed ZeRO. Configs are Hydra overrides.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True)


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


if __name__ == "__main__":
    app()
