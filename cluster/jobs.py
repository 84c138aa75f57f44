"""Submit graft jobs to a Ray cluster through the Ray Jobs API, and follow them.

    graft submit finetune strategy=lora --address http://HEAD:8265
    graft status [JOB] / graft logs JOB [--follow] / graft stop JOB / graft list

The job runs the same command line the user would run locally (`graft finetune ...`,
overrides passed through verbatim, plus ``cluster.address=auto`` so the job joins the
cluster it runs on), with this project as the runtime_env working_dir. The config is
composed and checked here first: a bad value never reaches the cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.connect import PASS_THROUGH, WORKER_ENV, enable_token_auth

ROOT = Path(__file__).resolve().parents[1]
# Not uploaded with the job: environments, VCS, outputs, caches.
EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    ".cache",
    "**/__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    "outputs",
]
# Ray refuses working_dir packages above 500 MiB; stay well below.
MAX_UPLOAD_BYTES = 100 * 1024**2


class SubmitError(RuntimeError):
    """A clear, user-facing reason a cluster call failed (no stack trace)."""


def _spec(lines: list[str]) -> Any:
    import pathspec

    return pathspec.PathSpec.from_lines("gitwildmatch", lines)


def _ignore_files(directory: Path) -> list[tuple[Path, Any]]:
    """The ignore specs a directory adds, as Ray's upload reads them: its .gitignore
    (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and its .rayignore, each relative to it."""
    names = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        names.insert(0, ".gitignore")
    return [
        (directory, _spec((directory / name).read_text().splitlines()))
        for name in names
        if (directory / name).is_file()
    ]


def upload_size(root: Path = ROOT) -> tuple[int, int]:
    """(bytes, files) of the working_dir Ray would upload: EXCLUDES (gitwildmatch,
    relative to the root) and every .gitignore / .rayignore on the way, through
    pathspec, as Ray's own packaging applies them."""
    root = Path(root)
    excludes = _spec(EXCLUDES)
    total = files = 0

    def skipped(path: Path, specs: list[tuple[Path, Any]], is_dir: bool) -> bool:
        suffix = "/" if is_dir else ""
        if excludes.match_file(path.relative_to(root).as_posix() + suffix):
            return True
        return any(
            spec.match_file(path.relative_to(base).as_posix() + suffix) for base, spec in specs
        )

    def walk(directory: Path, specs: list[tuple[Path, Any]]) -> None:
        nonlocal total, files
        specs = specs + _ignore_files(directory)
        for path in sorted(directory.iterdir()):
            is_dir = path.is_dir() and not path.is_symlink()
            if skipped(path, specs, is_dir):
                continue
            if is_dir:
                walk(path, specs)
            elif path.is_file():
                total += path.stat().st_size
                files += 1

    walk(root, [])
    return total, files


def job_id(run_name: str, kind: str) -> str:
    """Readable and unique: graft-<kind>-<run name>-<UTC time>, in Ray's id alphabet."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-")
    return f"graft-{kind}-{safe}-{stamp}"


def entrypoint(kind: str, overrides: list[str]) -> str:
    joins = not any(
        o.split("=", 1)[0].lstrip("+~") in ("cluster", "cluster.address") for o in overrides
    )
    args = [*overrides, *(["cluster.address=auto"] if joins else [])]
    return " ".join(["python", "-m", "cluster.cli", kind, "-q", *map(shlex.quote, args)])


def client(address: str, token_file: str | None = None) -> Any:
    """A JobSubmissionClient, or SubmitError saying what is wrong with the address or token."""
    if token_file:
        if not Path(token_file).is_file():
            raise SubmitError(f"--token-file: no such file {token_file!r}")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).resolve())
    enable_token_auth()  # before Ray reads the auth mode
    from ray.job_submission import JobSubmissionClient

    if not re.match(r"^https?://[^/]+", address):
        raise SubmitError(
            f"--address: {address!r} is not the dashboard's HTTP address, e.g. http://HEAD:8265"
        )
    _probe(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise SubmitError(_explain(address, e)) from None


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds when nothing answers, or when it is not a Ray dashboard."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout_s) as r:
            body = r.read(4096)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # a Ray dashboard asking for its token: the client call says more
        raise SubmitError(
            f"--address: {address} answered HTTP {e.code} at /api/version: not a Ray dashboard "
            "(the Jobs API is on the head's dashboard port, 8265 by default)"
        ) from None
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(
            f"--address: nothing answers at {address} ({reason}); is the Ray head up?"
        ) from None
    try:
        json.loads(body)["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise SubmitError(
            f"--address: {address} is not a Ray dashboard (no ray_version at /api/version)"
        ) from None


def _explain(address: str, error: Exception) -> str:
    text = str(error)
    if "Authentication required" in text or "401" in text:
        return (
            f"the cluster at {address} wants a token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or --token-file (its ~/.ray/auth_token)"
        )
    if "Authentication failed" in text or "403" in text or "InvalidAuthToken" in text:
        return f"the cluster at {address} refused the token: it is not this cluster's token"
    return f"{address}: {text.strip().splitlines()[0] if text.strip() else type(error).__name__}"


@dataclass
class Submitted:
    job_id: str
    entrypoint: str
    upload_bytes: int
    upload_files: int


def submit(
    kind: str, overrides: list[str], run_name: str, *, address: str, token_file: str | None = None
) -> Submitted:
    size, files = upload_size()
    if size > MAX_UPLOAD_BYTES:
        raise SubmitError(
            f"the working_dir to upload is {size / 1024**2:.0f} MiB ({files} files), over "
            f"{MAX_UPLOAD_BYTES / 1024**2:.0f} MiB: move data out of the project or add it to EXCLUDES"
        )
    jobs = client(address, token_file)
    env = dict(WORKER_ENV, **{k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
    # The job's driver joins with ray.init(runtime_env=...) too: let Ray merge the two.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    command = entrypoint(kind, overrides)
    submission_id = job_id(run_name, kind)
    try:
        jobs.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env},
            metadata={"graft_kind": kind, "graft_run": run_name},
        )
    except Exception as e:
        raise SubmitError(_explain(address, e)) from None
    return Submitted(submission_id, command, size, files)


def follow_logs(jobs: Any, job: str) -> None:
    """Print a job's log lines as they come, until it ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def wait(jobs: Any, job: str, timeout_s: float, interval_s: float = 1.0) -> str:
    """Poll until the job is in a terminal state; returns it."""
    deadline = time.time() + timeout_s
    while True:
        status = str(jobs.get_job_status(job))
        status = status.split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.time() > deadline:
            return status
        time.sleep(interval_s)
