"""Fail fast on the Hugging Face hub: offline mode or no route answers in seconds, not minutes.

Plugins call these before handing a hub id to transformers, datasets or huggingface_hub.

The hub libraries retry for a long time when the network is down; a training run should instead
say at once which key names a hub id and what to use instead.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from urllib.parse import urlparse

from meshtrain.errors import UserError

PROBE_TIMEOUT_S = 3.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
OFFLINE_HINT = 'give a local path, or use the built-in corpus with source = "offline"'


def looks_like_hub_id(value: str) -> bool:
    """'org/name' or 'name', not a path ('./x', '/x', '~/x', 'a/b/c') or a file name."""
    has_suffix = bool(re.search(r"\.(txt|jsonl?|parquet|csv|arrow)$", value))
    return bool(_HUB_ID.match(value)) and not has_suffix


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE asks for no network."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    flags = (os.environ.get(name, "").strip().lower() for name in names)
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def offline_error(key: str, value: str, what: str) -> UserError:
    """The one-line error for a hub id that cannot be fetched in offline mode."""
    return UserError(
        f"{key}: {value!r} is not a local {what} and the Hugging Face hub is offline "
        f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) with no cached copy; {OFFLINE_HINT}"
    )


def require_hub(key: str, value: str) -> None:
    """Raise unless the hub answers a TCP connect within PROBE_TIMEOUT_S."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as err:
            result.append(err)

    # A thread, because DNS lookups ignore socket timeouts and can hang far longer.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    if not result or result[0] is not None:
        why = "no answer" if not result else str(result[0]) or type(result[0]).__name__
        raise UserError(
            f"{key}: cannot reach the Hugging Face hub ({host}: {why}) to fetch "
            f"{value!r}; {OFFLINE_HINT} (or HF_HUB_OFFLINE=1 for a cached copy)"
        )


def hub_problem(name: str, key: str, hint: str) -> str:
    """'' when `name` is a local path or the hub can be used; else one line naming `key`."""
    if os.path.exists(os.path.expanduser(name)):
        return ""
    if hub_offline():
        return (
            f"{key}: {name!r} is not a local path and the Hugging Face hub is offline "
            f"(HF_HUB_OFFLINE); {hint}"
        )
    try:
        require_hub(key, name)
    except UserError:
        return (
            f"{key}: {name!r} is not a local path and the Hugging Face hub is not reachable; {hint}"
        )
    return ""
