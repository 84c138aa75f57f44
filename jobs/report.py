"""A sweep's report: Markdown + HTML with PNG plots, a trial table, and the best config
as a Hydra experiment file that ``graft finetune +experiment=<it>`` reruns.

The generic plots are Optuna's own (``optuna.visualization``: history, slices, parallel
coordinates, importances, Pareto front), each as a PNG and an interactive plotly page;
the learning curves (per training step, ASHA's prunes marked) and the baseline chart
with its negative-transfer verdict are graft's.

    python -m jobs.report runs/<sweep-name>          # same as: graft report runs/<sweep-name>

Everything comes from the Optuna study (so a study shared by several drivers reports
whole) plus the sweep directory's sweep.json, config.yaml and summary.json.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from conf.schema import FinetuneConfig, ParamSpec
from jobs import config as config_lib
from jobs import runlog

REPORT = "report"
STRATEGY_COLORS = {
    "feature_extraction": "#1f77b4",
    "freeze_depth": "#ff7f0e",
    "lora": "#2ca02c",
    "full": "#d62728",
}


@dataclasses.dataclass
class TrialRow:
    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    curve: list[tuple[int, float]]
    stopped_at_eval: int | None
    run_dir: str | None
    retry_of: int | None
    # From a finished trial's end record, shown beside the objectives: the forgetting
    # probe's ``forgotten`` (eval.source_path), a multi-task run's per-task accuracies.
    extras: dict[str, float] = dataclasses.field(default_factory=dict)


def _save(fig: Any, path: Path) -> None:
    """A plot written whole (beside it, then renamed): see runlog.write_atomic."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def load_config(sweep_dir: Path) -> FinetuneConfig:
    return config_lib.load_saved(sweep_dir)


def _rows(study: Any) -> list[TrialRow]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("over_budget"):
            continue
        curve = [tuple(p) for p in t.user_attrs.get("curve", [])] or sorted(
            t.intermediate_values.items()
        )
        history = t.system_attrs.get("retry_history") or []
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                values=list(t.values) if t.values is not None else None,
                params=dict(t.params),
                curve=[(int(e), float(v)) for e, v in curve],
                stopped_at_eval=t.user_attrs.get("stopped_at_eval"),
                run_dir=t.user_attrs.get("run_dir"),
                retry_of=int(history[0]) if history else None,
                extras=_extras(t.user_attrs.get("run_dir")),
            )
        )
    return rows


def _extras(run_dir: str | None) -> dict[str, float]:
    """The end record's ``forgotten`` (accuracy before - after on the source data) and
    ``eval_accuracy/<task>`` (multi-task), where the trial has them."""
    from jobs import runlog

    if not run_dir or not (Path(run_dir) / runlog.METRICS).is_file():
        return {}
    records = runlog.read(Path(run_dir))
    end: dict[str, Any] = next((r for r in reversed(records) if r.get("event") == "end"), {})
    return {
        k: float(v)
        for k, v in end.items()
        if (k == "forgotten" or k.startswith("eval_accuracy/")) and isinstance(v, (int, float))
    }


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[TrialRow], metric: str, eval_every: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if not r.curve:
            continue
        steps = [e * eval_every for e, _ in r.curve]
        values = [v for _, v in r.curve]
        color = STRATEGY_COLORS.get(str(r.params.get("strategy")), None)
        style = "o--" if r.state == "PRUNED" else "o-"
        ax.plot(steps, values, style, color=color, alpha=0.8, markersize=3, label=f"#{r.number}")
        if r.state == "PRUNED":
            ax.plot(steps[-1], values[-1], "x", color="black", markersize=9)
    ax.set(
        xlabel="training step",
        ylabel=metric,
        title="Learning curves (dashed, ending in x: pruned)",
    )
    if len(rows) <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# Optuna's own plots (optuna.visualization): each a PNG (its matplotlib backend) for the
# Markdown report and an interactive plotly HTML page beside it, linked from report.html.
OPTUNA_PLOTS = {
    "history": ("Optimization history", "plot_optimization_history"),
    "slices": ("Slice plots", "plot_slice"),
    "parallel": ("Parallel coordinates", "plot_parallel_coordinate"),
    "importances": ("Parameter importances", "plot_param_importances"),
    "pareto": ("Pareto front", "plot_pareto_front"),
}


def optuna_plot(study: Any, name: str, path: Path, **kwargs: Any) -> Path:
    """``optuna.visualization``'s plot ``name`` of the study: <name>.png and <name>.html
    (its plotly.js in plotly.min.js beside it: the page works offline). Returns the HTML."""
    import numpy as np
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    _plt()
    function = OPTUNA_PLOTS[name][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is "experimental"
        axes = getattr(vis_mpl, function)(study, **kwargs)
        figure = getattr(vis, function)(study, **kwargs)
    fig = np.ravel(axes)[0].figure
    if name != "slices":
        fig.set_size_inches(7, 4.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of Optuna's axes do not fit tight_layout
        fig.tight_layout()
    _save(fig, path)
    _plt().close(fig)
    page = path.with_suffix(".html")
    tmp = page.with_name(f".{page.stem}.{os.getpid()}.{threading.get_ident()}.html")
    figure.write_html(tmp, include_plotlyjs="directory", full_html=True)
    tmp.replace(page)
    return page


def plot_confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    """A confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    plt = _plt()
    k = len(labels)
    side = min(12.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=7 if k > 12 else 9)
    ax.set_yticks(range(k), labels, fontsize=7 if k > 12 else 9)
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                color = "white" if n > top / 2 else "black"
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def per_class(matrix: list[list[int]], labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall and support of each label from a confusion matrix."""
    out = {}
    for i, name in enumerate(labels):
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        out[name] = {
            "precision": matrix[i][i] / predicted if predicted else 0.0,
            "recall": matrix[i][i] / actual if actual else 0.0,
            "support": actual,
        }
    return out


def confusion_of(end: dict[str, Any]) -> tuple[str, list[list[int]], list[str]] | None:
    """(split, matrix, labels) of a classification run's end record: the test split's
    when there is one, else validation's."""
    labels = end.get("labels")
    for split in ("test", "eval"):
        matrix = end.get(f"{split}_confusion")
        if labels and matrix:
            return split, matrix, list(labels)
    return None


def plot_baselines(
    best: float, baselines: dict[str, float], metric: str, title: str, path: Path
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = ["best pretrained", *baselines]
    values = [best, *baselines.values()]
    ax.bar(labels, values, color=["#2ca02c", *["#7f7f7f"] * len(baselines)])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.4g}", ha="center", va="bottom")
    ax.set(ylabel=metric, title=title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- best config
def experiment_yaml(cfg: FinetuneConfig, header: list[str]) -> str:
    """A Hydra experiment file that sets every training-relevant section in full, so the
    rerun trains exactly the trial's config whatever the group defaults are."""
    node = OmegaConf.structured(cfg)
    sections = {
        k: OmegaConf.to_container(node[k])
        for k in ("model", "data", "strategy", "deepspeed", "scaling", "train")
    }
    lines = ["# @package _global_", *(f"# {h}" for h in header)]
    return "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(sections))


# --------------------------------------------------------------------------- report
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(sweep_dir: Path, storage: str | None = None) -> Path:
    """Write <sweep_dir>/report/: report.md, report.html, *.png, best.yaml. Returns the
    report directory."""
    import optuna

    from jobs import space as space_lib
    from jobs import study as study_lib

    sweep_dir = Path(sweep_dir).resolve()
    meta_path = sweep_dir / "sweep.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    meta = json.loads(meta_path.read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=meta["study"], storage=study_lib.open_storage(storage or meta["storage"])
    )
    out = sweep_dir / REPORT
    out.mkdir(exist_ok=True)
    objectives = meta["objectives"]
    metric, mode = objectives[0]["metric"], objectives[0]["mode"]
    space = {k: ParamSpec(**v) for k, v in meta["space"].items()}
    summary_path = sweep_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = _rows(study)
    counts = {s: sum(r.state == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    notes: list[str] = []
    plots: list[tuple[str, str]] = []

    def plot(name: str, title: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args, out / name)
            plots.append((name, title))
        except Exception as e:  # a plot that cannot be drawn is said, not skipped silently
            notes.append(f"{title}: not drawn ({type(e).__name__}: {e})")

    complete = [r for r in rows if r.state == "COMPLETE"]
    multi = len(objectives) > 1
    names = [o["metric"] for o in objectives]
    # One objective's view of a multi-objective study; Optuna's importances (PED-ANOVA)
    # explain reaching *low* values, so a maximised objective is negated for them.
    first = {"target": (lambda t: t.values[0]), "target_name": metric} if multi else {}
    sign = -1.0 if mode == "max" else 1.0

    def optuna_plot_of(name: str, minimum: int = 1, **kwargs: Any) -> None:
        title = OPTUNA_PLOTS[name][0]
        if len(complete) < minimum:
            notes.append(f"{title}: need at least {minimum} complete trials")
            return
        try:
            optuna_plot(study, name, out / f"{name}.png", **kwargs)
            plots.append((f"{name}.png", title))
        except Exception as e:  # a plot that cannot be drawn is said, not skipped silently
            notes.append(f"{title}: not drawn ({type(e).__name__}: {e})")

    optuna_plot_of("history", **first)
    plot("curves.png", "Learning curves", plot_curves, rows, metric, meta["eval_every"])
    optuna_plot_of("slices", **first)
    optuna_plot_of("parallel", minimum=2, **first)
    optuna_plot_of(
        "importances",
        minimum=3,
        target=lambda t: sign * t.values[0],
        target_name=f"{metric}" + (" (negated: maximised)" if mode == "max" else ""),
    )
    front: set[int] = set()
    if multi and complete:
        front = {t.number for t in study.best_trials}
        optuna_plot_of("pareto", target_names=names)

    best = summary.get("best")
    verdict = ""
    if best and summary.get("baselines"):
        gain = summary.get("transfer_gain")
        if summary.get("negative_transfer"):
            verdict = (
                f"NEGATIVE TRANSFER: the best pretrained trial ({_fmt(best['values'][0])}) does not beat "
                f"the from-scratch baseline ({_fmt(summary['baselines'].get('scratch'))}) on {metric} "
                f"by the margin {summary.get('margin', 0):g} (gain {_fmt(gain)})."
            )
        elif gain is not None:
            verdict = f"Transfer gain (best pretrained - scratch) on {metric}: {gain:+.4g}."
        refs = {k: v for k, v in summary["baselines"].items() if v is not None}
        plot(
            "baselines.png",
            "Baselines",
            plot_baselines,
            best["values"][0],
            refs,
            metric,
            "NEGATIVE TRANSFER" if summary.get("negative_transfer") else "Transfer vs baselines",
        )

    if best:
        row = next((r for r in rows if r.number == best["number"] and r.run_dir), None)
        where = (summary.get("retrained") or {}).get("run_dir") or (row.run_dir if row else None)
        end = None
        if where:
            records = runlog.read(Path(str(where)))
            end = next((r for r in reversed(records) if r.get("event") == "end"), None)
        found = confusion_of(end) if end else None
        if found:
            split, matrix, labels = found
            which = "retrained best" if summary.get("retrained") else f"best trial {best['number']}"
            title = (
                f"Confusion matrix: {which}, {'test' if split == 'test' else 'validation'} split"
            )
            plot("confusion.png", title, plot_confusion, matrix, labels, title)
    best_yaml = None
    if best:
        cfg = load_config(sweep_dir)
        # The retrained run's config when there is one (the full train.max_steps), else
        # the trial's length with what the user asked of a run (baseline eval, export).
        base = space_lib.full_base(cfg)
        if not summary.get("retrained"):
            trial = space_lib.trial_base(cfg)
            base = dataclasses.replace(
                base, train=dataclasses.replace(cfg.train, max_steps=trial.train.max_steps)
            )
        trial_cfg = space_lib.apply(base, space, best["params"])
        header = [
            f"Best trial {best['number']} of sweep {meta['name']}: {metric} = {_fmt(best['values'][0])}",
            f"Rerun: graft finetune +experiment={out / 'best.yaml'}",
            f"Params: {space_lib.describe(best['params'])}",
        ]
        best_yaml = out / "best.yaml"
        runlog.write_atomic(best_yaml, experiment_yaml(trial_cfg, header))

    md = _markdown(
        meta, rows, counts, objectives, best, summary, verdict, plots, notes, front, best_yaml
    )
    runlog.write_atomic(out / "report.md", md)
    runlog.write_atomic(
        out / "report.html",
        _html(meta, rows, counts, objectives, best, verdict, plots, notes, front, best_yaml),
    )
    return out


def rung_counts(meta: dict[str, Any], rows: list[TrialRow]) -> list[list[Any]]:
    """Per stratum (the scheduler's stratify_by parameter, else all trials): how many
    trials reached each rung, and how many completed."""
    rungs = meta.get("rungs") or []
    if not rungs:
        return []
    key = meta.get("stratify_by")
    strata: dict[str, list[TrialRow]] = {}
    for r in rows:
        strata.setdefault(str(r.params.get(key, "all")) if key else "all", []).append(r)
    table = []
    for name, members in sorted(strata.items()):
        reached = [max((e for e, _ in r.curve), default=0) for r in members]
        table.append(
            [
                name,
                *[sum(1 for x in reached if x >= rung) for rung in rungs],
                sum(1 for r in members if r.state == "COMPLETE"),
            ]
        )
    return table


def _extra_columns(rows: list[TrialRow], objectives: list[dict[str, str]]) -> list[str]:
    """The end-record columns some trial has (forgotten, per-task accuracies; the mean
    last), unless they are objectives already."""
    metrics = {o["metric"] for o in objectives}
    names = {k for r in rows for k in r.extras} - metrics
    return sorted(names, key=lambda k: (k != "forgotten", k.endswith("/mean"), k))


def _table_header(
    objectives: list[dict[str, str]], params: list[str], extras: list[str] | None = None
) -> list[str]:
    return [
        "trial",
        "state",
        *[o["metric"] for o in objectives],
        *(extras or []),
        *params,
        "stopped at eval",
    ]


def _table_rows(
    rows: list[TrialRow], objectives: list[dict[str, str]], params: list[str], front: set[int]
) -> list[list[str]]:
    table = []
    extras = _extra_columns(rows, objectives)
    for r in rows:
        values: list[float | None] = [None] * len(objectives) if r.values is None else [*r.values]
        values += [r.extras.get(k) for k in extras]
        number = (
            f"{r.number}"
            + (" (Pareto)" if r.number in front else "")
            + (f" (retry of {r.retry_of})" if r.retry_of is not None else "")
        )
        table.append(
            [
                number,
                r.state.lower(),
                *[_fmt(v) if v is not None else "" for v in values],
                *[_fmt(r.params[p]) if p in r.params else "" for p in params],
                str(r.stopped_at_eval) if r.stopped_at_eval else "",
            ]
        )
    return table


def _markdown(
    meta: dict[str, Any],
    rows: list[TrialRow],
    counts: dict[str, int],
    objectives: list[dict[str, str]],
    best: dict[str, Any] | None,
    summary: dict[str, Any],
    verdict: str,
    plots: list[tuple[str, str]],
    notes: list[str],
    front: set[int],
    best_yaml: Path | None,
) -> str:
    params = list(meta["space"])
    lines = [
        f"# Sweep {meta['name']}",
        "",
        f"Study `{meta['study']}` in `{meta['storage']}`: {len(rows)} trials "
        f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed, "
        f"{counts['RUNNING']} running). Objectives: "
        + ", ".join(f"{o['mode']} {o['metric']}" for o in objectives)
        + ".",
        "",
    ]
    if best:
        lines += [
            f"**Best trial: {best['number']}**, {objectives[0]['metric']} = {_fmt(best['values'][0])}: "
            f"{', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}.",
            "",
        ]
        test = (summary.get("best") or {}).get("test") or {}
        if test:
            lines += [
                "Chosen on validation; on the held-out test split: "
                + ", ".join(f"{k} = {_fmt(v)}" for k, v in test.items())
                + ".",
                "",
            ]
        if best_yaml:
            lines += [f"Rerun it: `graft finetune +experiment={best_yaml}`", ""]
    for kind, value in summary.get("baselines", {}).items():
        if value is not None:
            test = summary.get("baselines_test", {}).get(kind) or {}
            extra = (
                f" (test: {', '.join(f'{k} = {_fmt(v)}' for k, v in test.items())})" if test else ""
            )
            lines.append(f"- baseline {kind}: {objectives[0]['metric']} = {_fmt(value)}{extra}")
    if verdict:
        lines += ["", f"**{verdict}**" if "NEGATIVE" in verdict else verdict]
    from jobs.sweep import describe_summary

    result = [line for line in describe_summary(summary) if not line.startswith("no trial")]
    if result:
        lines += ["", "## Result", "", *[f"- {line}" for line in result]]
    rung_rows = rung_counts(meta, rows)
    if rung_rows:
        rungs = meta.get("rungs", [])
        lines += [
            "",
            "## Rungs",
            "",
            f"Trials of each {meta.get('stratify_by') or 'kind'} that reached each rung "
            f"(evaluations of {meta['eval_every']} steps; scheduler {meta.get('scheduler', 'asha')}):",
            "",
            "| " + " | ".join(["stratum", *[f"eval {r}" for r in rungs], "complete"]) + " |",
            "|" + "---|" * (len(rungs) + 2),
            *["| " + " | ".join(map(str, row)) + " |" for row in rung_rows],
        ]
    lines += ["", "## Trials", ""]
    header = _table_header(objectives, params, _extra_columns(rows, objectives))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(rows, objectives, params, front)]
    lines += ["", "## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for name, title in plots]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines) + "\n"


def _html(
    meta: dict[str, Any],
    rows: list[TrialRow],
    counts: dict[str, int],
    objectives: list[dict[str, str]],
    best: dict[str, Any] | None,
    verdict: str,
    plots: list[tuple[str, str]],
    notes: list[str],
    front: set[int],
    best_yaml: Path | None,
) -> str:
    e = html.escape
    params = list(meta["space"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Sweep {e(meta['name'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        ".neg{color:#b00;font-weight:bold}</style></head><body>",
        f"<h1>Sweep {e(meta['name'])}</h1>",
        f"<p>Study <code>{e(meta['study'])}</code>: {len(rows)} trials ({counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed, {counts['RUNNING']} running).</p>",
    ]
    if best:
        parts.append(
            f"<p><b>Best trial: {best['number']}</b>, {e(objectives[0]['metric'])} = {_fmt(best['values'][0])}: "
            + e(", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
            + "</p>"
        )
        if best_yaml:
            parts.append(
                f"<p>Rerun it: <code>graft finetune +experiment={e(str(best_yaml))}</code></p>"
            )
    if verdict:
        parts.append(f"<p class='{'neg' if 'NEGATIVE' in verdict else ''}'>{e(verdict)}</p>")
    header = _table_header(objectives, params, _extra_columns(rows, objectives))
    parts.append(
        "<h2>Trials</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
    )
    for row in _table_rows(rows, objectives, params, front):
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table><h2>Plots</h2>")
    for name, title in plots:
        stem = name.removesuffix(".png")
        live = f" <a href='{e(stem)}.html'>(interactive)</a>" if stem in OPTUNA_PLOTS else ""
        parts.append(f"<h3>{e(title)}{live}</h3><img src='{e(name)}' alt='{e(title)}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: python -m jobs.report runs/<sweep-name>")
    print(write_report(Path(args[0])))


if __name__ == "__main__":
    main()
