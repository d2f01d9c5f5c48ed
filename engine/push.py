"""`python -m engine push RUN --repo-id USER/NAME`: upload a run's model folder (with its model card) to the
Hugging Face Hub with huggingface_hub's upload_folder. Needs the network and a token with write access;
without them it stops with one clear line, before anything is sent. `--dry-run` shows what would go.
"""

from __future__ import annotations

from pathlib import Path

from engine import runfolder
from engine.errors import UserError


def folder_to_upload(path: str | Path) -> Path:
    """The model folder a push sends: a run's final/, or a model or adapter folder as given (best/, merge's output)."""
    folder = runfolder.model_folder(path)
    if not runfolder.is_model_folder(folder):
        raise UserError(f"{folder}: a checkpoint holds only weights, not a model to upload; push the run (its final/), best/ or a merged folder")
    return folder


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push(path: str | Path, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """Upload; returns the commit's URL (or, with dry_run, a description of what would be uploaded)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError
    from huggingface_hub.utils import validate_repo_id

    folder = folder_to_upload(path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--repo-id: '{repo_id}' is not a repository id like user/model-name ({exc})") from None
    if "/" not in repo_id:
        raise UserError(f"--repo-id: '{repo_id}' needs its owner: user/model-name or organization/model-name")
    if dry_run:
        listing = "\n".join(f"  {name}" for name in files_of(folder))
        return f"would upload {folder} to https://huggingface.co/{repo_id} ({'private' if private else 'public'}):\n{listing}"
    if constants.HF_HUB_OFFLINE:
        raise UserError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it on a machine with network access")
    token = get_token()
    if not token:
        raise UserError(
            "push: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"Upload {folder.name} with tunesmith")
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"push: the hub refused the upload to {repo_id}: {first}; check the token's write access and the repository id") from None
    except (OSError, ConnectionError) as exc:
        raise UserError(f"push: could not reach huggingface.co ({type(exc).__name__}: {exc}); check the network and try again") from None
    except Exception as exc:  # httpx transport errors (connection refused, DNS, timeouts) are not OSErrors
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise UserError(f"push: could not reach huggingface.co ({type(exc).__name__}: {exc}); check the network and try again") from None
    return str(getattr(commit, "commit_url", commit))
