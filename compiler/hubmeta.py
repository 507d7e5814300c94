"""Column names of a hub dataset, read from its card's metadata (no data is downloaded).

``tunec validate`` checks templates against a task's columns; a hub source
without ``columns:`` gets them from here when the hub can be reached, briefly.
"""

from __future__ import annotations

import os
from typing import Any

from .recipe import HubSource

TIMEOUT_S = 5.0  # validate stays quick on a slow or blocked network


def offline() -> bool:
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())


def hub_columns(source: HubSource) -> list[str] | None:
    """The dataset's columns for its configuration (``name``), or None when they cannot be known."""
    if offline():
        return None
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(source.id, revision=source.revision, timeout=TIMEOUT_S)
    except Exception:  # noqa: BLE001 - unreachable, unknown or gated: the caller warns instead
        return None
    return columns_from_card(getattr(info, "card_data", None), source.name)


def columns_from_card(card: Any, name: str | None) -> list[str] | None:
    """Columns from a dataset card's ``dataset_info`` (one mapping, or one per configuration).

    >>> card = {"dataset_info": [{"config_name": "a", "features": [{"name": "text"}, {"name": "label"}]},
    ...                          {"config_name": "b", "features": [{"name": "x"}]}]}
    >>> one = {"dataset_info": card["dataset_info"][1]}
    >>> columns_from_card(card, "a"), columns_from_card(card, "c"), columns_from_card(one, None)
    (['text', 'label'], None, ['x'])
    """
    meta = card.get("dataset_info") if hasattr(card, "get") else None
    configs = meta if isinstance(meta, list) else [meta] if isinstance(meta, dict) else []
    chosen = [c for c in configs if isinstance(c, dict) and (c.get("config_name", "default") == (name or "default")
                                                              or (name is None and len(configs) == 1))]
    features = chosen[0].get("features") if chosen else None
    if not isinstance(features, list):
        return None
    cols = [f.get("name") for f in features if isinstance(f, dict)]
    return [str(c) for c in cols] if cols and all(isinstance(c, str) for c in cols) else None
