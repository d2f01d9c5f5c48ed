"""The Hugging Face hub, reached through from_pretrained: fail at once, in one line, when it cannot be.

Without a network, huggingface_hub retries each file for about a minute before from_pretrained gives
up. Before loading a hub id (not a local folder) the engine honours HF_HUB_OFFLINE, and otherwise
opens one TCP connection to the hub's address (HF_ENDPOINT) with a short timeout: unreachable, a model
already in the local hub cache is loaded from there (local_files_only), anything else is a UserError
naming HF_HUB_OFFLINE=1 and local folders.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from engine.errors import UserError

PROBE_SECONDS = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


@functools.lru_cache(maxsize=8)
def _reachable(url: str) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy: a direct connection says nothing; let huggingface_hub try
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def reachable() -> bool:
    return _reachable(endpoint())


def in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # not a valid repo id, no cache folder
        return False


def load_options(name: str, key: str) -> dict[str, bool]:
    """Extra from_pretrained arguments for `name` (the value of recipe key `key`); {} for a local folder."""
    if not name or os.path.isdir(name):
        return {}
    if offline():
        return {"local_files_only": True}
    if reachable():
        return {}
    if in_cache(name):
        return {"local_files_only": True}
    raise UserError(
        f"{key}: '{name}' is not a local folder, not in the local hub cache, and the hub ({endpoint()}) cannot be reached; "
        f"connect to the network, or point {key} at a local folder (one written by save_pretrained); "
        f"set HF_HUB_OFFLINE=1 to use only models already downloaded"
    )


def offline_help(name: str, key: str) -> str:
    return (
        f"{key}: '{name}' is not a local folder, and with HF_HUB_OFFLINE=1 set only the local hub cache is used, which does not hold it; "
        f"download it once with the network on, or point {key} at a local folder (one written by save_pretrained)"
    )
