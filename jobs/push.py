"""``graft push RUN --repo ID``: a run's export (model or adapter, tokenizer, labels and
its model card, README.md) uploaded to the Hugging Face Hub with ``huggingface_hub``.

    graft push runs/<run-name> --repo my-org/my-model [--private] [--merged]

The token comes from ``--token``, ``$HF_TOKEN`` or ``hf auth login``'s saved token. Every
check that needs no network (the export, the repo id, ``HF_HUB_OFFLINE``) runs first.
"""

from __future__ import annotations

import os
from pathlib import Path

from conf.schema import ConfigError


def folder(run: Path, *, merged: bool = False) -> Path:
    """What is uploaded: the run's export, or its merged LoRA model with ``merged``."""
    run = Path(run).expanduser()
    export = run if run.name == "export" else run / "export"
    if not export.is_dir():
        raise ConfigError("RUN", f"{run} has no export/ (train with run.export=true)")
    if merged:
        export = export / "merged"
        if not export.is_dir():
            raise ConfigError(
                "--merged",
                f"{run} has no merged model; make one with graft merge-lora {run}",
            )
    return export


def check_repo(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(
            "--repo", f"{repo_id!r} is not a Hub repo id ({e}); e.g. my-org/my-model"
        ) from None
    if "/" not in repo_id:
        raise ConfigError("--repo", f"{repo_id!r}: give it as owner/name, e.g. my-org/my-model")


def push(
    run: Path,
    repo_id: str,
    *,
    private: bool = False,
    merged: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Upload; returns the commit's URL."""
    source = folder(run, merged=merged)
    check_repo(repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ConfigError(
            "HF_HUB_OFFLINE",
            "is set: pushing needs the network; run with HF_HUB_OFFLINE=0 where the Hub is reachable",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(source),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message or f"graft: {Path(run).expanduser().resolve().name}",
        )
    except HfHubHTTPError as e:
        raise ConfigError(
            "--repo", f"the Hub refused {repo_id}: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:  # no route, refused, DNS, timeout: the HTTP client's own errors
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise ConfigError(
            "HF_ENDPOINT", f"could not reach the Hub at {endpoint} ({type(e).__name__})"
        ) from None
    return str(getattr(info, "commit_url", info))
