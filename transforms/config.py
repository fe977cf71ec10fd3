"""The base of every stage's options dataclass (``ConceptsConfig``, ``ClipConfig``, ...).

A config file has one section per stage; :meth:`StageConfig.from_dict` builds the
stage's dataclass from its section, rejecting unknown keys with the valid ones named,
and runs the stage's own :meth:`StageConfig.validate`.
"""

from __future__ import annotations

import dataclasses


class StageConfig:
    """Mixin for a stage's options dataclass."""

    @classmethod
    def from_dict(cls, data: dict, where: str = "config"):
        """Build from a config section; unknown keys and invalid values name ``where``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the option when a value is invalid."""