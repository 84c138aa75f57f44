"""The graft command line: thin wrappers over the library.

graft finetune [hydra overrides]      e.g. graft finetune strategy=lora deepspeed=zero3
graft finetune --cfg [job|hydra|all]  print the composed config (or Hydra's node) and exit
graft sweep [hydra overrides]         e.g. graft sweep sweep.num_trials=40 sweep.max_concurrent=4
graft report runs/<sweep-name>        report.md/html, plots and best.yaml of a sweep
graft predict runs/<run> --input FILE  the trained model on new records -> predictions.jsonl
graft check [overrides]               every preflight check, without Ray; graft ls, graft cp
graft merge-lora runs/<run>           a LoRA adapter merged into its base
graft chat runs/<run>                 talk to a causal-LM run in the terminal
graft plan [overrides] [--num-gpus 8] [--gpu-memory 80GiB] [--recommend]   will it fit?
graft cluster up|down|status          a local multi-process Ray cluster
graft submit finetune|sweep [overrides] --address http://HEAD:8265
graft status [JOB] | logs JOB [--follow] | stop JOB | list     jobs on a cluster
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

app = typer.Typer(
    name="graft",
    help="Transfer-learning fine-tuning on Ray with DeepSpeed ZeRO. Configs are Hydra overrides.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish)
)
err = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"graft {version('graft')}")
        raise typer.Exit()


@app.callback()
def _root(
    _: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print graft's version and exit."
        ),
    ] = False,
) -> None:
    """graft: fine-tune pretrained models on Ray (embedded local cluster by default)."""


def _complete_override(incomplete: str) -> list[str]:
    """Shell completion of an override: a group's options after ``group=``, else the
    groups (``+experiment=`` for experiments)."""
    groups = config_groups()
    key, eq, value = incomplete.partition("=")
    if eq:
        return [f"{key}={o}" for o in groups.get(key.lstrip("+"), []) if o.startswith(value)]
    names = [("+" if g == "experiment" else "") + g + "=" for g in groups]
    return [n for n in names if n.startswith(incomplete)]


Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides, e.g. model=tiny_llama strategy=lora train.lr=3e-4 +experiment=x",
        show_default=False,
        autocompletion=_complete_override,
    ),
]


CfgOption = Annotated[
    str | None,
    typer.Option(
        "--cfg",
        metavar="[job|hydra|all]",
        show_default=False,
        help="Print the config and exit, as Hydra's --cfg: job (the composed, validated "
        "config; what a bare --cfg means), hydra (Hydra's own node) or all (both).",
    ),
]


class CfgCommand(TyperCommand):
    """A command whose ``--cfg`` value may be left out, as in Hydra: a bare ``--cfg``
    (last, or before an override) means ``--cfg job``. Click has optional option values
    but Typer does not pass them on, so the word is put in before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        from jobs.config import CFG_PARTS

        given, out = list(args), []
        for i, arg in enumerate(given):
            if arg == "--":
                out += given[i:]
                break
            out.append(arg)
            if arg == "--cfg" and (i + 1 == len(given) or given[i + 1] not in CFG_PARTS):
                out.append("job")
        return super().parse_args(ctx, out)


# The jobs `graft finetune|sweep|submit|k8s render` run: kind -> module with run(cfg).
JOBS = {"finetune": "jobs.finetune", "sweep": "jobs.sweep"}


# `graft submit|k8s render KIND`: which job, its choices in help and completion.
JobKind = Annotated[
    str,
    typer.Argument(
        metavar="finetune|sweep",
        help="What to run: finetune or sweep.",
        autocompletion=lambda incomplete: [k for k in JOBS if k.startswith(incomplete)],
    ),
]


@contextmanager
def exits(*errors: type[BaseException], label: str = "error", code: int = 2) -> Iterator[None]:
    """One user-facing error line on stderr and exit ``code`` (2: bad input) for the
    ``errors`` a command expects; anything else is a bug and keeps its traceback."""
    try:
        yield
    except errors as e:
        err.print(f"[red]{label}:[/red] {escape(str(e))}")  # a [list] in it is text
        raise typer.Exit(code) from None


def _kind(kind: str, verb: str) -> str:
    if kind not in JOBS:
        err.print(f"[red]error:[/red] {kind!r}: {verb} takes {' or '.join(JOBS)}")
        raise typer.Exit(2)
    return kind


def _job(kind: str) -> Any:
    import importlib

    return importlib.import_module(JOBS[kind])


def _compose(overrides: list[str] | None, config_name: str):  # type: ignore[no-untyped-def]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from jobs.config import compose

    with exits(HydraException, OmegaConfBaseException, ValueError, label="config error"):
        return compose(overrides or [], config_name=config_name)


@app.command(cls=CfgCommand)
def finetune(
    overrides: Overrides = None,
    cfg: CfgOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress bar.")] = False,
    info: Annotated[
        bool, typer.Option("--info", help="Hydra's view: search path, group options; exit.")
    ] = False,
) -> None:
    """Fine-tune a model: an embedded local Ray by default, or cluster.address=... ."""
    _run("finetune", overrides, show_config=cfg, quiet=quiet, info=info)


@app.command(cls=CfgCommand)
def sweep(
    overrides: Overrides = None,
    cfg: CfgOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No live progress lines.")] = False,
    info: Annotated[
        bool, typer.Option("--info", help="Hydra's view: search path, group options; exit.")
    ] = False,
) -> None:
    """Sweep the transfer space with Optuna on Ray Tune (conf/sweep.yaml, conf/sweep/).
    Rerunning the same command resumes the sweep."""
    _run("sweep", overrides, show_config=cfg, quiet=quiet, info=info)


@app.command("eval")
def eval_(
    kind: Annotated[
        str,
        typer.Argument(
            metavar="zero_shot|few_shot|RUN",
            help="zero_shot or few_shot (the pretrained model, no training), or a run "
            "directory runs/<run> (its export, on --data).",
        ),
    ],
    overrides: Overrides = None,
    cfg: Annotated[
        bool, typer.Option("--cfg", help="Print the composed, validated config and exit.")
    ] = False,
    data: Annotated[
        Path | None, typer.Option("--data", help="With a run: the labelled file to score.")
    ] = None,
) -> None:
    """Score the validation (and test) split with a model that trains nothing: a causal
    LM by label likelihood after eval.templates, an encoder by embedding similarity
    (few_shot: eval.shots training examples per label). No Ray. Writes
    runs/<model>-<data>-<kind>-<hash>/metrics.jsonl. With a run directory: its export
    scored on --data (accuracy, macro-F1, per-class precision/recall and the confusion
    matrix; a language model's loss and perplexity), printed as JSON."""
    from conf.schema import ConfigError
    from jobs import zeroshot
    from jobs.config import to_yaml

    if Path(kind).is_dir():
        import json

        from jobs import predict as predict_lib

        if data is None:
            err.print("[red]error:[/red] --data: graft eval RUN needs a labelled file to score")
            raise typer.Exit(2)
        with exits(ConfigError, OSError):
            scores = predict_lib.evaluate_file(predict_lib.load(Path(kind)), data)
        typer.echo(json.dumps(scores, indent=2))
        return

    if kind not in zeroshot.KINDS:
        err.print(f"[red]error:[/red] {kind!r}: graft eval takes {' or '.join(zeroshot.KINDS)}")
        raise typer.Exit(2)
    given = list(overrides or [])
    config = None
    # Classification data is scored whatever head model.task would train (a causal LM
    # is set up for causal_lm); other data gets the baseline's own error below.
    if not any(o.split("=", 1)[0].lstrip("+") == "model.task" for o in given):
        from jobs.config import compose

        try:
            config = compose([*given, "model.task=sequence_classification"])
        except Exception:
            config = None
    config = config or _compose(given, "finetune")
    if cfg:
        typer.echo(to_yaml(config))
        return
    with exits(ConfigError):
        zeroshot.run(config, kind)


def _cfg_part(show_config: str | None) -> str | None:
    """Which part ``--cfg`` prints (None: it was not given)."""
    from jobs.config import CFG_PARTS

    if show_config is None or show_config in CFG_PARTS:
        return show_config
    err.print(
        f"[red]error:[/red] --cfg {escape(show_config)!r}: takes {'|'.join(CFG_PARTS)} "
        "(or nothing, meaning job)"
    )
    raise typer.Exit(2)


def _run(
    kind: str,
    overrides: list[str] | None,
    *,
    show_config: str | None,
    quiet: bool,
    info: bool = False,
) -> None:
    """`graft finetune|sweep`: compose, print (--cfg, --info) or run here; errors exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from conf.schema import ConfigError
    from jobs import timeline
    from jobs.config import hydra_yaml, to_yaml
    from jobs.config import info as hydra_info
    from jobs.finetune import RunFailed

    timeline.COMMAND_STARTED = timeline.process_started()  # start-up counts from here
    overrides = list(overrides or [])
    part = _cfg_part(show_config)
    if info:
        with exits(HydraException, OmegaConfBaseException, ValueError, label="config error"):
            typer.echo(hydra_info(overrides, config_name=kind))
        return

    config = _compose(overrides, kind)
    if part is not None:
        if part in ("job", "all"):
            typer.echo(to_yaml(config))
        if part in ("hydra", "all"):
            with exits(HydraException, OmegaConfBaseException, label="config error"):
                typer.echo(hydra_yaml(overrides, config_name=kind))
        return
    with exits(RunFailed, label="failed", code=1), exits(ConfigError, ConnectionError):
        _job(kind).run(config, show_progress=not quiet)


@app.command()
def plan(
    overrides: Overrides = None,
    num_gpus: Annotated[
        int | None,
        typer.Option(help="Data-parallel ranks (GPUs) to plan for; default: what scaling/ asks."),
    ] = None,
    gpu_memory: Annotated[
        str, typer.Option(help="Memory of one device, e.g. 80GiB, 40GB, 24GiB.")
    ] = "80GiB",
    recommend: Annotated[
        bool,
        typer.Option(
            "--recommend", help="Also print the cheapest configurations that fit, as overrides."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Preflight: per-device memory (parameters, gradients, optimizer states, activations)
    and compatibility checks, from the model's config on the meta device; no weights are
    loaded, no GPU is needed. Exits 1 when it does not fit or a check fails."""
    import json

    from conf.schema import ConfigError
    from jobs import plan as planner

    config = _compose(_plan_overrides(overrides or []), "finetune")
    if num_gpus is not None and num_gpus < 1:
        err.print(f"[red]error:[/red] --num-gpus: must be >= 1, got {num_gpus}")
        raise typer.Exit(2)
    with exits(ConfigError, ValueError):
        device = planner.parse_size(gpu_memory)
        result = planner.estimate(config, num_gpus=num_gpus, device_bytes=device)
        options = (
            planner.recommend(config, num_gpus=num_gpus, device_bytes=device) if recommend else None
        )
    if as_json:
        typer.echo(json.dumps(planner.to_dict(result, options), indent=2))
    else:
        console = Console(width=max(Console().width, 120), soft_wrap=True)
        planner.render(result, console, options=options, overrides=overrides or [])
    if not result.ok:
        raise typer.Exit(1)


def _plan_overrides(overrides: list[str]) -> list[str]:
    """What `graft plan model=llama3_8b` needs to plan at all, added and said in one
    line: a plan reads no data, so when no override names the data the data task
    follows the model's (a causal LM: instruction); a bfloat16 model plans with
    deepspeed.bf16=true unless deepspeed.bf16 is given."""
    from conf.schema import DATA_MODEL_TASKS, ConfigError
    from jobs.config import compose

    added: list[str] = []
    for _ in range(3):
        try:
            compose([*overrides, *added])
            break
        except ConfigError as e:
            given = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
            if e.key == "model.task" and not any(g.startswith("data") for g in given):
                model_task = _model_task(overrides)
                task = next((d for d, m in DATA_MODEL_TASKS.items() if model_task in m), None)
                if task is None:
                    break
                added.append(f"data.task={task}")
            elif e.key == "deepspeed.bf16" and "deepspeed.bf16" not in given:
                added.append("deepspeed.bf16=true")
            else:
                break
        except Exception:  # (any other error: the normal path reports it)
            break
    if added:
        err.print(f"graft: planning with {' '.join(added)} (from the model; a plan reads no data)")
    return [*overrides, *added]


def _model_task(overrides: list[str]) -> str | None:
    from omegaconf import DictConfig, OmegaConf

    for o in overrides:
        if o.startswith("model.task="):
            return o.split("=", 1)[1]
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), None)
    if model is None or not (CONF / "model" / f"{model}.yaml").is_file():
        return None
    node = OmegaConf.load(CONF / "model" / f"{model}.yaml")
    task = node.get("task") if isinstance(node, DictConfig) else None
    return str(task) if task else None


def _name(config: Any, kind: str) -> str:
    """The run's deterministic name (a sweep's: its sweep name)."""
    return str(_job(kind).run_name(config))


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

    with exits(ConfigError, FileNotFoundError, KeyError):
        out = write_report(run, storage=storage)
    typer.echo(f"{out / 'report.md'}\n{out / 'report.html'}\n{out / 'best.yaml'}")


class DashboardKind(enum.StrEnum):
    auto = "auto"
    optuna = "optuna"
    tensorboard = "tensorboard"


@app.command()
def dashboard(
    target: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_OR_SWEEP",
            help="A sweep directory (optuna-dashboard), a run or a folder of runs (TensorBoard).",
        ),
    ],
    kind: Annotated[
        DashboardKind,
        typer.Option(help="Which dashboard (auto: optuna for a sweep, else TensorBoard)."),
    ] = DashboardKind.auto,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port; 0 takes a free one.")] = 0,
    storage: Annotated[
        str | None,
        typer.Option(help="The study's storage URL, when it is not the one in sweep.json."),
    ] = None,
) -> None:
    """Serve a sweep's study (optuna-dashboard) or runs' curves (TensorBoard); prints the URL."""
    from conf.schema import ConfigError
    from jobs.dashboard import serve

    with exits(ConfigError, OSError):
        try:
            serve(
                target, kind=kind.value, host=host, port=port, storage=storage, announce=typer.echo
            )
        except KeyboardInterrupt:
            pass


# --------------------------------------------------------------------------- configs
CONF = Path(__file__).resolve().parents[1] / "conf"


def config_groups() -> dict[str, list[str]]:
    """Each config group under conf/ and its options (the schema entries left out)."""
    return {
        group.name: sorted(f.stem for f in group.glob("*.yaml") if not f.stem.endswith("_schema"))
        for group in sorted(CONF.iterdir())
        if group.is_dir() and not group.name.startswith("_") and any(group.glob("*.yaml"))
    }


@app.command("ls")
def ls_() -> None:
    """The config groups and their options (pick one with GROUP=NAME), and experiments
    (+experiment=NAME)."""
    for group, names in config_groups().items():
        how = "+experiment=" if group == "experiment" else f"{group}="
        typer.echo(f"{group:<12} {', '.join(names)}    ({how}NAME)")


@app.command()
def cp(
    name: Annotated[str, typer.Argument(help="GROUP/NAME, e.g. strategy/lora (see graft ls).")],
    path: Annotated[Path, typer.Argument(help="Where to write the copy (a .yaml file).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite PATH.")] = False,
) -> None:
    """Copy a shipped config to edit, e.g. graft cp strategy/lora my_lora.yaml."""
    group, _, option = name.partition("/")
    groups = config_groups()
    if group not in groups or option not in groups[group]:
        allowed = ", ".join(f"{g}/{o}" for g, opts in groups.items() for o in opts)
        err.print(f"[red]error:[/red] {name!r} is not a shipped config; allowed: {allowed}")
        raise typer.Exit(2)
    if path.exists() and not force:
        err.print(f"[red]error:[/red] {path} exists; give --force to overwrite it")
        raise typer.Exit(2)
    path.write_text((CONF / group / f"{option}.yaml").read_text())
    typer.echo(f"graft: {group}/{option} -> {path}")


@app.command()
def check(
    overrides: Overrides = None,
    show_config: Annotated[
        bool, typer.Option("--cfg", help="Print the composed, validated config too.")
    ] = False,
) -> None:
    """Every check a run makes before Ray starts (config, model, data, the run directory,
    a rerun's checkpoints), without starting Ray or writing anything."""
    from conf.schema import ConfigError
    from jobs import finetune
    from jobs.checkpoint import NoUsableCheckpoint
    from jobs.config import to_yaml

    config = _compose(overrides, "finetune")
    if show_config:
        typer.echo(to_yaml(config))
    with exits(ConfigError, NoUsableCheckpoint, OSError):
        finetune.check_only(config)
    typer.echo("graft: every check passed")


data_app = typer.Typer(help="Look at a run's data before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    overrides: Overrides = None,
    examples: Annotated[int, typer.Option(min=0, help="How many examples to show.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """The first examples as the model sees them (tokens, what the loss trains on),
    label counts, token-length percentiles and how many are truncated; no Ray."""
    import json

    from conf.schema import ConfigError
    from jobs.preview import preview

    config = _compose(overrides, "finetune")
    with exits(ConfigError, OSError):
        shown = preview(config, examples=examples)
    if as_json:
        typer.echo(json.dumps(shown, indent=2, ensure_ascii=False))
        return
    splits = shown["splits"]
    typer.echo(
        f"{shown['task']}: {splits['train']} train / {splits['eval']} eval / {splits['test']} test"
    )
    if "labels" in shown:
        typer.echo("labels (train): " + ", ".join(f"{k}={v}" for k, v in shown["labels"].items()))
    if "lengths" in shown:
        lengths = ", ".join(f"{k} {v}" for k, v in shown["lengths"].items())
        typer.echo(
            f"tokens: {lengths}; {shown['truncated']} over data.max_length={shown['max_length']}"
        )
    for i, item in enumerate(shown["examples"]):
        if "image" in item:  # (an image task's record: the file and its label)
            typer.echo(f"--- example {i} (image)\nimage: {item['image']}")
        else:
            typer.echo(f"--- example {i} ({item.get('num_tokens', '?')} tokens)")
            typer.echo(f"input: {item.get('text', item.get('record'))!r}")
        if "trained_text" in item:
            typer.echo(f"trained on ({item['trained_tokens']} tokens): {item['trained_text']!r}")
        elif "label" in item:
            typer.echo(f"label: {item['label']}")


# --------------------------------------------------------------------------- use the model
RunArg = Annotated[Path, typer.Argument(help="A run directory, runs/<run-name> (or its export/).")]


@app.command()
def predict(
    run: RunArg,
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Records to predict on (.jsonl, .csv, .txt).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write; default: <run>/predictions.jsonl."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Records per forward pass.")] = 16,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens to generate (causal LM, seq2seq).")
    ] = 64,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="Sampling temperature; 0: greedy.")
    ] = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Run a trained model on new records: label + probabilities (a classifier), or a
    generation (a causal LM or seq2seq model), one JSON line per record."""
    from rich.progress import Progress

    from conf.schema import ConfigError
    from jobs import predict as predict_lib

    with exits(ConfigError, OSError):
        trained = predict_lib.load(run)
        records = predict_lib.read_input(trained, input)
    target = output or (predict_lib.run_config(run)[0] / "predictions.jsonl")
    gen = predict_lib.Generation(max_new_tokens=max_new_tokens, temperature=temperature)
    with Progress(console=err, disable=quiet, transient=True) as bar:
        task = bar.add_task(f"predict ({trained.kind} model)", total=len(records))
        rows = predict_lib.predict(
            trained,
            records,
            batch_size=batch_size,
            generation=gen,
            progress=lambda n: bar.advance(task, n),
        )
        n = predict_lib.write_predictions(rows, target)
    typer.echo(f"graft: {n} predictions -> {target}")


@app.command()
def push(
    run: RunArg,
    repo: Annotated[str, typer.Option(help="The Hub repo, owner/name (made if absent).")],
    private: Annotated[bool, typer.Option(help="Make a new repo private.")] = False,
    merged: Annotated[
        bool, typer.Option(help="Push the merged LoRA model (export/merged) instead.")
    ] = False,
    token: Annotated[
        str | None, typer.Option(help="Hub token; default $HF_TOKEN or the saved login.")
    ] = None,
    message: Annotated[str | None, typer.Option(help="The commit message.")] = None,
) -> None:
    """Upload a run's export (weights or adapter, tokenizer, model card) to the Hugging Face Hub."""
    from conf.schema import ConfigError
    from jobs import push as push_lib

    with exits(ConfigError):
        url = push_lib.push(run, repo, private=private, merged=merged, token=token, message=message)
    typer.echo(f"graft: pushed {run} -> {url}")


@app.command("merge-lora")
def merge_lora(
    run: RunArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Default: <run>/export/merged.")
    ] = None,
) -> None:
    """Merge a LoRA run's adapter into its base: a plain transformers model."""
    from conf.schema import ConfigError
    from jobs import predict as predict_lib

    with exits(ConfigError, OSError):
        target = predict_lib.merge_lora(run, output)
    typer.echo(f"graft: merged model -> {target}")


@app.command()
def chat(
    run: RunArg,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy.")] = 0.7,
) -> None:
    """Talk to a causal-LM run in the terminal (through its tokenizer's chat template);
    an empty line or Ctrl-D ends."""
    from conf.schema import ConfigError
    from jobs import predict as predict_lib

    with exits(ConfigError, OSError):
        trained = predict_lib.load(run)
        if trained.labels is not None or trained.cfg.model.task != "causal_lm":
            raise ConfigError(
                "RUN", f"{run} is a {trained.cfg.model.task} run; chat needs a causal_lm one"
            )
    gen = predict_lib.Generation(max_new_tokens=max_new_tokens, temperature=temperature)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = predict_lib.chat_reply(trained, history, gen)
        history.append({"role": "assistant", "content": reply})
        typer.echo(f"model> {reply}")


# --------------------------------------------------------------------------- clusters and jobs
cluster_app = typer.Typer(help="A local multi-process Ray cluster (head + worker nodes).")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    num_cpus: Annotated[int, typer.Option(help="CPUs per node.")] = 2,
    workers: Annotated[int, typer.Option(help="Worker nodes besides the head.")] = 1,
) -> None:
    """Start a head and worker nodes with `ray start` on free loopback ports."""
    from cluster import local

    if num_cpus < 1 or workers < 0:
        err.print("[red]error:[/red] --num-cpus must be >= 1 and --workers >= 0")
        raise typer.Exit(2)
    with exits(RuntimeError):
        state = local.up(num_cpus, workers)
    typer.echo(f"graft: Ray cluster up: {workers + 1} nodes x {num_cpus} CPUs")
    typer.echo(f"graft: GCS {state['address']} (cluster.address={state['address']})")
    typer.echo(
        f"graft: dashboard / Jobs API {state['dashboard']} (graft submit ... --address {state['dashboard']})"
    )
    typer.echo(f"graft: {local.token_help()}")
    typer.echo("graft: for Ray's own `ray job ...` commands: export RAY_AUTH_MODE=token")


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop the nodes `graft cluster up` started (and nothing else)."""
    from cluster import local

    pids = local.down()
    typer.echo(f"graft: stopped {len(pids)} node(s)" if pids else "graft: no graft cluster is up")


@cluster_app.command("status")
def cluster_status() -> None:
    """Show the local cluster `graft cluster up` started."""
    from cluster import local

    state = local.status()
    if state is None:
        typer.echo("graft: no graft cluster is up")
        raise typer.Exit(1)
    typer.echo(f"GCS        {state['address']}")
    typer.echo(f"dashboard  {state['dashboard']}")
    typer.echo(f"processes  {len(state['alive'])}/{len(state['pids'])} node processes alive")
    typer.echo(
        f"nodes      {state['nodes']} alive"
        + (f" ({state['error']})" if state.get("error") else "")
    )


Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The head's dashboard URL (Jobs API), e.g. http://HEAD:8265; default: "
        "RAY_API_SERVER_ADDRESS, else the cluster from `graft cluster up`.",
        show_default=False,
    ),
]
TokenFile = Annotated[
    str | None, typer.Option("--token-file", help="The cluster's auth token file.")
]


def _address(address: str | None) -> str:
    from cluster import local

    found = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not found and (state := local.read_state()):
        found = state["dashboard"]
    if not found:
        err.print(
            "[red]error:[/red] --address: give the Ray dashboard URL, e.g. --address http://HEAD:8265"
        )
        raise typer.Exit(2)
    return found


def _client(address: str | None, token_file: str | None):  # type: ignore[no-untyped-def]
    from cluster.jobs import SubmitError, client

    with exits(SubmitError):
        return client(_address(address), token_file)


@app.command()
def submit(
    kind: JobKind,
    overrides: Overrides = None,
    address: Address = None,
    token_file: TokenFile = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the logs until the job ends.")
    ] = False,
) -> None:
    """Submit `graft finetune|sweep [overrides]` to a Ray cluster (the config is checked here first)."""
    from cluster import jobs

    config = _compose(overrides, _kind(kind, "submit"))
    name = _name(config, kind)
    with exits(jobs.SubmitError):
        done = jobs.submit(
            kind, list(overrides or []), name, address=_address(address), token_file=token_file
        )
    typer.echo(
        f"graft: uploaded the project ({done.upload_bytes / 1024:.0f} KiB, {done.upload_files} files)"
    )
    typer.echo(f"graft: submitted {done.job_id}")
    typer.echo(f"graft: entrypoint: {done.entrypoint}")
    if wait:
        client = _client(address, token_file)
        jobs.follow_logs(client, done.job_id)
        status = jobs.wait(client, done.job_id, timeout_s=60)
        typer.echo(f"graft: {done.job_id} {status}")
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def _table(rows: list[list[str]], header: list[str]) -> None:
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    import shutil

    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)


def _job_row(info: Any) -> list[str]:
    import datetime

    started = (
        datetime.datetime.fromtimestamp(info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        if info.start_time
        else ""
    )
    took = (
        f"{(info.end_time - info.start_time) / 1000:.0f}s"
        if info.end_time and info.start_time
        else ""
    )
    return [
        info.submission_id or info.job_id or "",
        str(info.status).split(".")[-1],
        started,
        took,
        info.entrypoint[:80],
    ]


@app.command()
def status(
    job: Annotated[str | None, typer.Argument(help="A job id; all jobs when left out.")] = None,
    address: Address = None,
    token_file: TokenFile = None,
) -> None:
    """Status of one job, or of all jobs."""
    jobs = _client(address, token_file)
    header = ["job", "status", "started", "took", "entrypoint"]
    if job is None:
        _table([_job_row(i) for i in jobs.list_jobs()], header)
        return
    try:
        info = jobs.get_job_info(job)
    except Exception as e:
        err.print(f"[red]error:[/red] {job}: {str(e).splitlines()[0]}")
        raise typer.Exit(2) from None
    _table([_job_row(info)], header)
    if info.message:
        typer.echo(info.message)


@app.command("list")
def list_jobs(address: Address = None, token_file: TokenFile = None) -> None:
    """All jobs on the cluster, newest first."""
    jobs = _client(address, token_file)
    infos = sorted(jobs.list_jobs(), key=lambda i: i.start_time or 0, reverse=True)
    _table([_job_row(i) for i in infos], ["job", "status", "started", "took", "entrypoint"])


@app.command()
def logs(
    job: Annotated[str, typer.Argument(help="A job id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends.")
    ] = False,
    address: Address = None,
    token_file: TokenFile = None,
) -> None:
    """A job's driver log."""
    from cluster.jobs import follow_logs

    jobs = _client(address, token_file)
    try:
        if follow:
            follow_logs(jobs, job)
        else:
            typer.echo(jobs.get_job_logs(job), nl=False)
    except Exception as e:
        err.print(f"[red]error:[/red] {job}: {str(e).splitlines()[0]}")
        raise typer.Exit(2) from None


@app.command()
def stop(
    job: Annotated[str, typer.Argument(help="A job id.")],
    address: Address = None,
    token_file: TokenFile = None,
) -> None:
    """Stop a running job."""
    from cluster.jobs import wait

    jobs = _client(address, token_file)
    try:
        jobs.stop_job(job)
    except Exception as e:
        err.print(f"[red]error:[/red] {job}: {str(e).splitlines()[0]}")
        raise typer.Exit(2) from None
    typer.echo(f"graft: {job} {wait(jobs, job, timeout_s=60)}")


# --------------------------------------------------------------------------- kubernetes
k8s_app = typer.Typer(help="KubeRay manifests from Hydra configs.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    kind: JobKind,
    overrides: Overrides = None,
    image: Annotated[
        str, typer.Option(help="The training image (k8s/Dockerfile).")
    ] = "ghcr.io/example/graft:0.1.0",
    namespace: Annotated[str | None, typer.Option(help="metadata.namespace of the RayJob.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print a RayJob (ray.io/v1) that runs `graft KIND OVERRIDES` on its own Ray cluster,
    sized from the config's scaling; checked against the KubeRay CRDs when present."""
    import yaml

    from cluster import k8s

    config = _compose(overrides, _kind(kind, "render"))
    name = _name(config, kind)
    job = k8s.render(kind, config, list(overrides or []), name, image=image, namespace=namespace)
    problems = k8s.operator_errors(job) + (k8s.validate([job]) if k8s.crd_dir() else [])
    if problems:
        err.print("[red]error:[/red] the rendered RayJob is not valid:\n" + "\n".join(problems))
        raise typer.Exit(2)
    text = yaml.safe_dump(job, sort_keys=False)
    if output:
        command = " ".join(
            ["graft k8s render", kind, *(overrides or []), "--image", image]
            + (["--namespace", namespace] if namespace else [])
            + ["-o", str(output)]
        )
        output.write_text(f"# Rendered by: {command}\n# kubectl apply -f this file.\n{text}")
        typer.echo(f"graft: wrote {output}")
    else:
        typer.echo(text, nl=False)


if __name__ == "__main__":
    app()
