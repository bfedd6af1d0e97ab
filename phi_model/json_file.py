"""Reading a JSON object from a file, every error naming the file (config.json, a checkpoint
index, meta.json, a training --config)."""
from __future__ import annotations

import json


def read_json_object(path: str, label: str | None = None, expected: str = "a JSON object") -> dict:
    """The JSON object in `path`. Raises ValueError starting with `label` (default: the path):
    unreadable, not valid JSON, or not an object ("expected <expected>")."""
    label = label or path
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}: not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{label}: cannot read: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{label}: expected {expected}, got {type(value).__name__}")
    return value
