"""Reaching the Hugging Face hub: decide in seconds whether it can be used, never retry for minutes.

Plugins call `hub_problem(name, key)` before handing a hub id to transformers or datasets.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

HUB_HOST = "huggingface.co"


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub does not answer within `timeout_s`."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_problem(name: str, key: str, offline_hint: str) -> str:
    """'' when `name` is a local path or the hub answers; else one line naming `key`."""
    if Path(name).expanduser().exists() or hub_reachable():
        return ""
    return (f"{key}: {name!r} is not a local path and the Hugging Face hub is not reachable "
            f"(offline); {offline_hint}")
