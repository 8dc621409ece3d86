"""The base of every options section: typed, frozen, validated once, errors in one line.

Each section is a pydantic model whose fields carry their own documentation: the CLI
builds its options and help from them (`mfbatch.cli_options`), the TOML file and the
Python API fill the same fields, and `load_config` validates everything once, before any
stage starts. A wrong type or value is a `ConfigError` naming the flag (when it came from
the command line) or the file's table and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from mfbatch.cores import machine_cores as machine_cores  # where the config rooms ask
from mfbatch.errors import ConfigError


def _path(value: Any) -> Any:
    if isinstance(value, Path):
        return value
    if isinstance(value, str) and value:
        return Path(value).expanduser()
    raise ValueError(f"expected a path (a string), got {value!r}")


# A path given as a string in TOML or the API; anything else is refused.
PathValue = Annotated[Path, BeforeValidator(_path)]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class Options(BaseModel):
    """Frozen, strict (no silent coercion: "3" is not a number), unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    # The fields the caller gave (the rest took defaults): `replace` re-derives the others.
    _given: frozenset[str] = PrivateAttr(frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_given(cls, data: Any, handler: Any) -> Any:
        if not isinstance(data, dict):  # an instance already validated
            return handler(data)
        model = handler(cls.derive(dict(data)))
        model._given = frozenset(data)
        return model

    @classmethod
    def derive(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Fill fields whose default depends on others (overridden by sections that have any)."""
        return values

    @classmethod
    def build(cls, values: dict[str, Any], where: str, flags: frozenset[str] = frozenset()) -> Any:
        """Validate `values`; an error names `--flag` for keys in `flags`, else `where key`."""
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(cls.model_fields))}"
            )
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else ""
            label = cls.flag(name) if name in flags else f"{where} {name}".strip()
            raise ConfigError(f"{label}: {_describe(error, values.get(name))}") from None

    @classmethod
    def flag(cls, name: str) -> str:
        """The field's command-line flag (first form of an on/off pair)."""
        extra = cls.model_fields[name].json_schema_extra
        given = extra.get("flag") if isinstance(extra, dict) else None
        return str(given).split("/")[0] if given else flag_name(name)

    def replace(self, **changes: Any) -> Any:
        """A copy with `changes`, validated again (derived defaults follow the new values)."""
        given = {name: getattr(self, name) for name in self._given}
        return type(self).build({**given, **changes}, type(self).__name__)


def _describe(error: Any, value: Any) -> str:
    kind = error["type"]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"expected a whole number, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"expected a number, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        hint = " (a string: write true or false without quotes)" if isinstance(value, str) else ""
        return f"expected true or false, got {value!r}{hint}"
    if kind == "string_type":
        return f"expected a string, got {value!r}"
    if kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        return f"{value!r} is not one of {allowed.replace(' or ', ', ').replace(chr(39), '')}"
    message = str(error.get("msg", "invalid value"))
    return message.removeprefix("Value error, ")


def check_threads(flag: str, value: int | None) -> None:
    """More threads than a few per core only thrashes; a typo must not start 100,000."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag}: must be a whole number >= 1, got {value!r}")
    most = 4 * machine_cores()
    if value > most:
        raise ConfigError(
            f"{flag}: {value} threads is more than 4x this machine's {machine_cores()} cores; "
            f"pass at most {most} (or leave it unset)"
        )
