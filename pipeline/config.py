"""Config files: one YAML file with a section per stage (``concepts:``, ...).

Each stage owns a dataclass of its options beside its transform
(``transforms.concepts.ConceptsConfig``, ...); this module reads the file and
hands each section to its dataclass, which rejects unknown keys.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def load_config_file(path: str | None) -> dict:
    """The parsed YAML file as a dict of sections ({} when ``path`` is None)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config: {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SystemExit(f"--config: {file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config: {file} must hold a mapping of sections (concepts:, ...), not {type(data).__name__}")
    return data


def section(data: dict, name: str, cls, path: str | None = None):
    """Build ``cls`` from section ``name`` of a loaded config (defaults where absent)."""
    values = data.get(name) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: section '{name}' must be a mapping")
    try:
        return cls.from_dict(values, where=f"{path or 'config'}: {name}")
    except (TypeError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
