"""The schema check every device's ``restore`` shares.

A saved dict may come from another Ferry version (a snapshot file, a migration peer). Failing
loudly on a version we do not understand is the only safe answer: a half-understood device
state would give the guest a machine that never existed.
"""

from __future__ import annotations

from typing import Any


def check_version(state: dict[str, Any], component: str, version: int) -> None:
    """Raise ValueError unless ``state`` is a ``component`` state of schema ``version``."""
    if not isinstance(state, dict):
        raise ValueError(f"{component} state must be a dict, got {type(state).__name__}")
    found = state.get("version")
    if found != version:
        raise ValueError(
            f"{component} state has schema version {found!r}; this Ferry reads version {version}"
        )
