"""Config files and command-line flags, the one path every command takes to its options.

A config file is one YAML file with a section per stage (``concepts:``, ...), or for
``daco steer`` / ``daco eval`` a ``defences:`` section with one mapping per fitted defence.
Each stage owns a dataclass of its options beside its transform
(``transforms.concepts.ConceptsConfig``, ...), each defence beside its steerer
(``steering.steerers.iar.IARFitConfig``, ...); all are :class:`steering.config.Config`.
A command builds its config from the file's section (:func:`section`), then applies the
flags the user gave with :func:`override` (the config's
:meth:`~steering.config.Config.override`). Unknown keys and bad values are errors naming
the file or ``command line`` and the option.
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


def section(data: dict, name: str, cls, path: str | None = None, parent: str = ""):
    """Build ``cls`` from section ``name`` of a loaded config (defaults where absent); ``parent``
    prefixes a nested section's name in errors (``"defences."``)."""
    values = _mapping(data, name, path, parent)
    try:
        return cls.from_dict(values, where=f"{path or 'config'}: {parent}{name}")
    except (TypeError, ValueError) as exc:
        raise SystemExit(str(exc)) from None


def _mapping(data: dict, name: str, path: str | None, parent: str = "") -> dict:
    values = data.get(name) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: section '{parent}{name}' must be a mapping")
    return values


def override(cfg, flags: dict, name: str):
    """``cfg`` with the flags the user gave (option -> value; None: not given), through
    :meth:`steering.config.Config.override`; a bad value exits naming ``command line: <name>.<option>``."""
    try:
        return cfg.override(flags, f"command line: {name}")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def defence_configs(path: str | None) -> dict:
    """Every fitted defence's fit config (method -> its ``fit_config``) from the ``defences:`` section
    of the config file ``path`` (``defences: {iar: {k: 8}}``); the defaults for a method not named."""
    from steering.steerers import STEERERS

    data = load_config_file(path)
    unknown = sorted(set(data) - {"defences"})
    if unknown:
        raise SystemExit(f"--config {path}: unknown section(s) {unknown}; valid: ['defences']")
    defences = _mapping(data, "defences", path)
    fitted = {name: cls for name, cls in sorted(STEERERS.items()) if cls.fitted}
    unknown = sorted(set(defences) - set(fitted))
    if unknown:
        raise SystemExit(f"--config {path}: defences: unknown method(s) {unknown}; the fitted defences are "
                         f"{sorted(fitted)}")
    return {name: section(defences, name, cls.fit_config, path, "defences.") for name, cls in fitted.items()}
