"""tests/benchmarks/minimal_ds_loop.py, unchanged, with its model in training mode.

    python -m torch.distributed.run --nproc_per_node 2 tests/benchmarks/minimal_ds_loop_train_mode.py OUT.json CONFIG.json

The minimal loop trains the model as ``jobs.models.build`` returns it: from
``from_pretrained``, in eval mode, so its dropout layers do nothing. graft trains in
training mode (dropout on, as the model's config asks). MiniLM has dropout 0.1; the
tiny LLaMA has none, so there both loops compute the same. This variant calls
``.train()`` on the built model and changes nothing else: bench_overhead.py reports the
step rate against both loops.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import jobs.models  # noqa: E402

_build = jobs.models.build


def _build_in_train_mode(*args: Any, **kwargs: Any) -> Any:
    model, tokenizer = _build(*args, **kwargs)
    return model.train(), tokenizer


jobs.models.build = _build_in_train_mode  # (before the loop imports it by name)

import minimal_ds_loop  # noqa: E402

if __name__ == "__main__":
    minimal_ds_loop.main()
