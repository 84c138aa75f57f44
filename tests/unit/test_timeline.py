"""The start-up timeline's clock (jobs/timeline.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_a_process_start_is_read_on_the_wall_clock() -> None:
    """psutil's create_time adds the kernel's boot time, given in whole seconds: up to
    1 s off time.time(), which put the first step before the engine in the timeline.
    A fresh interpreter's start lies between its spawn and its first line of code."""
    before = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t = time.time(); from jobs import timeline; "
            "print(timeline.process_started(), t)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    started, first_line = map(float, out.split())
    assert before - 0.05 <= started <= first_line + 0.05, (before, started, first_line)
