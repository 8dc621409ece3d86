"""`Config`: every stage's options in one object, read from TOML and flags, validated once.

`load_config` reads an optional TOML file (`[data]`, `[split]`, `[preprocess]`, `[train]`,
`[score]`, `[evaluate]`, `[tune]` tables and a top-level `db`), applies the command line's (or the
Python API's) values on top, validates, and returns one frozen `Config`. Nothing
downstream sees a dict.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

from mfbatch.config.base import Options, _path
from mfbatch.config.sections import (
    DataConfig,
    EvaluateConfig,
    PreprocessConfig,
    ScoreConfig,
    SplitConfig,
)
from mfbatch.config.train import TrainConfig
from mfbatch.config.tune import TuneConfig
from mfbatch.errors import ConfigError

DEFAULT_DB = Path("mfbatch.duckdb")
SECTIONS: dict[str, type[Options]] = {
    "data": DataConfig,
    "split": SplitConfig,
    "preprocess": PreprocessConfig,
    "train": TrainConfig,
    "score": ScoreConfig,
    "evaluate": EvaluateConfig,
    "tune": TuneConfig,
}


class Config(BaseModel):
    """Everything one command needs, resolved from TOML and flags."""

    model_config = ConfigDict(frozen=True)

    db: Path = DEFAULT_DB
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view, stored with runs so a result says how it was made."""
        return self.model_dump(mode="json")

    def override(self, section: str, values: Mapping[str, Any], where: str = "") -> Config:
        """This config with `values` laid over one section, validated like flags."""
        if not values:
            return self
        current = getattr(self, section)
        given = {name: getattr(current, name) for name in current._given}
        merged = {**given, **{k: v for k, v in values.items() if v is not None}}
        built = SECTIONS[section].build(merged, where or f"[{section}]", frozenset(values))
        return self.model_copy(update={section: built})


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        # /dev/zero or a pipe is never read: it would not end.
        what = (
            "is a folder"
            if path.is_dir()
            else "is not a regular file"
            if path.exists()
            else "does not exist"
        )
        raise ConfigError(f"--config: {path} {what}; pass a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"--config: {path} can't be read ({exc})") from None


def load_config(
    path: Path | None = None,
    *,
    db: Path | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read `path` (TOML) if given, lay the non-None `overrides` per section over it,
    validate. A wrong type is a one-line error naming the key before any stage starts."""
    raw = _read_toml(path) if path is not None else {}
    unknown = sorted(set(raw) - {*SECTIONS, "db"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(unknown)}; use [{'], ['.join(SECTIONS)}] and db"
        )
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {name} must be a table ([{name}] then key = value lines), got {table!r}"
            )
        flags = {k: v for k, v in (overrides or {}).get(name, {}).items() if v is not None}
        where = f"[{name}]" if path is None else f"{path} [{name}]"
        sections[name] = cls.build({**table, **flags}, where, frozenset(flags))
    try:
        stored = _path(raw.get("db", str(DEFAULT_DB)))
    except ValueError as exc:
        raise ConfigError(f"{path} db: {exc}") from None
    return Config(db=db if db is not None else stored, **sections)
