"""Where option values come from, and how they are laid over each other.

Each source (a call, a pytest marker, ``[tool.gradguard]``, the environment,
flags, ini values) gives a `Given`: the values it set, checked by `OPTIONS`'
row for each, and where each came from, which a bad value's error names. The
entry points lay them over each other, lowest first (`layered`).

Torch-free, like `_config`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from gradguard._config import BY_NAME, OPTIONS, TABLE, Option


@dataclasses.dataclass(frozen=True)
class Given:
    """What one source set, or several laid over each other: values checked, and their origin.

    ``where`` names each option as its source does, for errors
    (``--accumulation-steps``); ``layer`` says which source won, for a report
    header (``command line``).
    """

    values: dict[str, object] = dataclasses.field(default_factory=dict)
    where: dict[str, str] = dataclasses.field(default_factory=dict)
    layer: dict[str, str] = dataclasses.field(default_factory=dict)

    def guard_options(self) -> dict[str, object]:
        """The values a guard takes (all but the run's own, such as its log)."""
        return {k: v for k, v in self.values.items() if BY_NAME[k].per_guard}


def layered(*layers: Given) -> Given:
    """``layers`` laid over each other, lowest first: each option's value is the last one's."""
    out = Given()
    for layer in layers:
        out.values.update(layer.values)
        out.where.update(layer.where)
        out.layer.update(layer.layer)
    return out


def _rebased(option: Option, value: object, base: str | None) -> object:
    if option.path and base is not None and isinstance(value, str) and value:
        return os.path.join(base, value)  # unchanged when value is absolute
    return value


def from_values(
    values: Mapping[str, object],
    where: Callable[[Option], str],
    layer: str,
    *,
    base: str | None = None,
    options: tuple[Option, ...] = OPTIONS,
) -> Given:
    """Check values given as Python or TOML values (a call, a marker, ``[tool.gradguard]``).

    Raises:
        TypeError, ValueError: a bad value, naming ``where(option)``.
    """
    out = Given()
    known = {option.name: option for option in options}
    for name, value in values.items():
        option = known[name]
        source = where(option)
        out.values[name] = option.check(_rebased(option, value, base), source)
        out.where[name] = source
        out.layer[name] = layer
    return out


def from_text(
    values: Mapping[str, object],
    where: Callable[[Option], str],
    layer: str,
    *,
    base: str | None = None,
) -> Given:
    """Check values a person typed (flags, variables, ini values); non-text ones as they are.

    A flag such as ``--no-check-numerics`` arrives as a bool, ini values as
    text or (``ignore`` from a TOML ini) a list.
    """
    typed = {
        name: BY_NAME[name].read(value) if isinstance(value, str) else value
        for name, value in values.items()
    }
    return from_values(typed, where, layer, base=base)


def unknown_names(given: Mapping[str, object], source: str, options: tuple[Option, ...]) -> None:
    """Raise a TypeError naming the first of ``given`` that is not among ``options``."""
    unknown = sorted(set(given) - {option.name for option in options})
    if unknown:
        names = ", ".join(option.name for option in options)
        raise TypeError(f"{source} has no option {unknown[0]!r}; the options are {names}")


def from_environment(environ: Mapping[str, str]) -> Given:
    """The options set by ``GRADGUARD`` and ``GRADGUARD_<NAME>``; empty ones are not set."""
    texts = {o.name: environ[o.env] for o in OPTIONS if environ.get(o.env, "").strip()}
    return from_text(texts, lambda o: f"the {o.env} environment variable", "environment")


def find_pyproject(start: str) -> str | None:
    """The first ``pyproject.toml`` in ``start`` or a directory above it: the project's."""
    directory = os.path.abspath(start)
    while True:
        path = os.path.join(directory, "pyproject.toml")
        if os.path.isfile(path):
            return path
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def from_pyproject(start: str) -> Given:
    """The options in ``[tool.gradguard]`` of the project's ``pyproject.toml``, if it has one.

    Paths in it are relative to the file.

    Raises:
        TypeError, ValueError: a bad value, an unknown key, or a file that is no TOML,
            each naming the file.
    """
    path = find_pyproject(start)
    if path is None:
        return Given()
    table = _tool_table(path)
    source = f"{TABLE} of {path}"
    if not isinstance(table, dict):
        raise TypeError(f"{source} must be a table of options; got {table!r}")
    unknown_names(table, source, OPTIONS)
    return from_values(
        table,
        lambda o: f"{o.name} in {source}",
        "pyproject.toml",
        base=os.path.dirname(path),
    )


def _toml() -> Any:
    """The TOML reader: tomllib, or on Python 3.10 tomli (which pytest installs there), or None."""
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli  # type: ignore[import-not-found, unused-ignore]
    except ModuleNotFoundError:
        return None
    return tomli


def _tool_table(path: str) -> object:
    """``[tool.gradguard]`` of the TOML file ``path``, or ``{}`` where there is none."""
    toml = _toml()
    if toml is None:
        with open(path, encoding="utf-8", errors="replace") as f:
            if TABLE[1:-1] in f.read():
                raise ValueError(
                    f"{path} has a {TABLE} table, and reading it needs Python 3.11 or "
                    "the tomli package: pip install tomli"
                )
        return {}
    try:
        with open(path, "rb") as f:
            document = toml.load(f)
    except (OSError, toml.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read {TABLE} from {path}: {exc}") from None
    tool = document.get("tool", {})
    return tool.get("gradguard", {}) if isinstance(tool, dict) else {}


def needs_log(given: Given, flag: str) -> None:
    """Raise when ``record_norms`` is on with no JSON log to write the norms to.

    ``flag`` is how the entry point's user names the log (``--log-json PATH``).
    """
    if given.values.get("record_norms") and given.values.get("log_json") is None:
        where = given.where["record_norms"]
        raise ValueError(f"{where} needs {flag}: the norms go to that file")
