"""A sweep's report: Markdown + HTML with PNG plots, a trial table, and the best config
as a Hydra experiment file that ``graft finetune +experiment=<it>`` reruns.

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


def plot_history(rows: list[TrialRow], metric: str, mode: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r.state == "COMPLETE" and r.values]
    pruned = [r for r in rows if r.state == "PRUNED" and r.curve]
    ax.scatter([r.number for r in done], [r.values[0] for r in done], label="complete")  # type: ignore[index]
    ax.scatter(
        [r.number for r in pruned],
        [r.curve[-1][1] for r in pruned],
        marker="x",
        color="grey",
        label="pruned (last eval)",
    )
    best, line = None, []
    for r in sorted(done, key=lambda r: r.number):
        v = r.values[0]  # type: ignore[index]
        best = v if best is None or (v > best if mode == "max" else v < best) else best
        line.append((r.number, best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="black", label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title="Optimization history")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


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


def plot_slices(rows: list[TrialRow], space: dict[str, ParamSpec], metric: str, path: Path) -> None:
    plt = _plt()
    done = [r for r in rows if r.state == "COMPLETE" and r.values]
    names = list(space)
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        spec = space[name]
        have = [r for r in done if name in r.params]
        if spec.type == "categorical":
            choices = [str(c) for c in spec.choices or []]
            xs = [choices.index(str(r.params[name])) for r in have]
            ax.set_xticks(range(len(choices)), choices, rotation=20, fontsize=7)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            xs = [r.params[name] for r in have]
            if spec.type == "log_float":
                ax.set_xscale("log")
        colors = [STRATEGY_COLORS.get(str(r.params.get("strategy")), "#333333") for r in have]
        ax.scatter(xs, [r.values[0] for r in have], c=colors)  # type: ignore[index]
        ax.set(title=name, ylabel=metric)
        if not have:
            ax.text(
                0.5,
                0.5,
                "no complete trial\nsampled it",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("Slices: each parameter against the objective (complete trials)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_importances(importances: dict[str, float], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (Optuna PED-ANOVA)", title="Parameter importances")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_pareto(rows: list[TrialRow], front: set[int], names: list[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r.state == "COMPLETE" and r.values]
    for on_front in (False, True):
        pts = [r for r in done if (r.number in front) == on_front]
        ax.scatter(
            [r.values[0] for r in pts],  # type: ignore[index]
            [r.values[1] for r in pts],  # type: ignore[index]
            color="red" if on_front else "grey",
            label="Pareto front" if on_front else "dominated",
        )
        for r in pts:
            ax.annotate(f"#{r.number}", (r.values[0], r.values[1]), fontsize=7)  # type: ignore[index]
    ax.set(xlabel=names[0], ylabel=names[1], title="Pareto front")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


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

    plot("history.png", "Optimization history", plot_history, rows, metric, mode)
    plot("curves.png", "Learning curves", plot_curves, rows, metric, meta["eval_every"])
    plot("slices.png", "Slice plots", plot_slices, rows, space, metric)
    complete = [r for r in rows if r.state == "COMPLETE"]
    if len(complete) >= 3:
        try:
            # Optuna's default evaluator (PED-ANOVA) explains reaching *low* target values.
            sign = -1.0 if mode == "max" else 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    study, target=lambda t: sign * t.values[0]
                )
            plot("importances.png", "Parameter importances", plot_importances, importances)
        except Exception as e:
            notes.append(f"Parameter importances: not computed ({type(e).__name__}: {e})")
    else:
        notes.append("Parameter importances: need at least 3 complete trials")
    front: set[int] = set()
    if len(objectives) > 1 and complete:
        front = {t.number for t in study.best_trials}
        plot(
            "pareto.png",
            "Pareto front",
            plot_pareto,
            rows,
            front,
            [o["metric"] for o in objectives],
        )

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
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
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
    parts += [f"<h3>{e(title)}</h3><img src='{e(name)}' alt='{e(title)}'>" for name, title in plots]
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
