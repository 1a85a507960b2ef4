"""pytest plugin: run a test suite with every optimizer guarded.

Registered through the ``pytest11`` entry point, so every pytest run in an
environment with gradguard loads it. It registers a flag and an ini key for
each option of gradguard's one table (``gradguard._config.OPTIONS``, which
imports no torch) and reads ``[tool.gradguard]`` from the ``pyproject.toml``
at or above the rootdir. torch is imported only once a test runs with
gradguard on (``--gradguard``, the ``gradguard`` ini key or ``[tool.gradguard]``
mode, ``GRADGUARD``, the marker or the ``gradguard_findings`` fixture).

Precedence, for every option: a ``guard(...)`` argument in the test's code >
marker > command line > environment > ini > ``[tool.gradguard]`` > default
(for the mode: off). A marker's ``ignore`` adds to the run's.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    from gradguard._config import Option
    from gradguard._findings import Finding
    from gradguard._session import Session
    from gradguard._sources import Given

FIXTURE = "gradguard_findings"

MODE_HELP = (
    "gradguard mode for every test: strict (a finding fails the test), warn (findings "
    "appear in the warnings summary), log (log events only) or off (the default). "
    "@pytest.mark.gradguard(mode=...) overrides it per test; the command line wins "
    "over the GRADGUARD environment variable, which wins over the ini value, which wins "
    "over [tool.gradguard] in pyproject.toml."
)
MARKER_HELP = (
    "gradguard(mode=None, ignore=(), **options): run this test with gradguard in mode "
    "strict, warn, log or off (default: the run's mode, strict if that is off), also "
    "ignoring these codes, with any other option of gradguard.guard"
)


@dataclass(frozen=True)
class Settings:
    """The run's gradguard options, checked, and where each came from."""

    given: Given

    @property
    def mode(self) -> str:
        return str(self.given.values.get("mode", "off"))

    @property
    def log_json(self) -> str | None:
        path = self.given.values.get("log_json")
        return None if path is None else str(path)


_SETTINGS: pytest.StashKey[Settings] = pytest.StashKey()
_LOG: pytest.StashKey[Any] = pytest.StashKey()
_SESSION: pytest.StashKey[Session | None] = pytest.StashKey()


def _help(option: Option) -> str:
    return MODE_HELP if option.name == "mode" else f"gradguard: {option.help}"


def pytest_addoption(parser: pytest.Parser) -> None:
    from gradguard._config import OPTIONS  # the table alone: no torch

    group = parser.getgroup("gradguard", "catch gradient-handling bugs in PyTorch training loops")
    for option in OPTIONS:
        how: dict[str, Any] = (
            {"action": argparse.BooleanOptionalAction}
            if option.boolean
            else {"metavar": "MODE" if option.name == "mode" else option.metavar}
        )
        group.addoption(
            option.pytest_flag, dest=option.ini, default=None, help=_help(option), **how
        )
        parser.addini(option.ini, _help(option))


class _BadSetting(ValueError):
    """A gradguard setting with a bad value; the message names where it came from."""


def _settings(config: pytest.Config) -> Settings:
    """Resolve the run's options: command line > environment > ini > ``[tool.gradguard]``.

    Raises:
        _BadSetting: a bad value, naming where it came from.
    """
    from gradguard._config import OPTIONS
    from gradguard._sources import from_environment, from_pyproject, from_text, layered, needs_log

    cli = {o.name: config.getoption(o.ini) for o in OPTIONS}
    ini = {o.name: config.getini(o.ini) for o in OPTIONS}
    # Paths in the ini file are relative to it, like pytest's own path settings.
    base = config.inipath.parent if config.inipath else config.rootpath
    try:
        given = layered(
            from_pyproject(str(config.rootpath)),
            from_text(
                {k: v for k, v in ini.items() if v not in ("", [], None)},
                lambda o: f"ini option {o.ini}",
                "ini",
                base=str(base),
            ),
            from_environment(os.environ),
            from_text(
                {k: v for k, v in cli.items() if v is not None},
                lambda o: f"the {o.pytest_flag} option",
                "command line",
            ),
        )
        needs_log(given, "--gradguard-log-json PATH")
    except (TypeError, ValueError) as exc:
        raise _BadSetting(f"gradguard: {exc}") from None
    return Settings(given)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        settings = _settings(config)
    except _BadSetting as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_SETTINGS] = settings
    if settings.log_json is not None:
        from gradguard._dispatch import add_record_sink, add_sink
        from gradguard._jsonlog import JsonLog

        try:
            log = JsonLog(settings.log_json, settings.given.where["log_json"])
        except (TypeError, ValueError) as exc:
            raise pytest.UsageError(f"gradguard: {exc}") from None
        # Records too: a test's guard(..., record_norms=True) writes its norms here.
        config.stash[_LOG] = (log, (add_sink(log), add_record_sink(log.write_record)))


def pytest_unconfigure(config: pytest.Config) -> None:
    entry = config.stash.get(_LOG, None)
    if entry is not None:
        log, handles = entry
        for handle in handles:
            handle.remove()
        log.close()


def pytest_report_header(config: pytest.Config) -> str | None:
    from gradguard._config import OPTIONS

    settings = config.stash[_SETTINGS]
    if settings.mode == "off" and not settings.log_json:
        return None
    given = settings.given
    parts = [f"mode={settings.mode} (from {given.layer.get('mode', 'default')})"]
    for option in OPTIONS[1:]:
        if option.name in given.values:
            value = given.values[option.name]
            shown = ",".join(sorted(value)) if isinstance(value, frozenset) else value
            parts.append(f"{option.flag[2:]}={shown}")
    return "gradguard: " + ", ".join(parts)


def _item_options(item: pytest.Item, settings: Settings) -> tuple[str, dict[str, object]]:
    """This test's mode and guard options: marker, then the fixture, then the run's.

    Raises:
        _BadSetting: a bad marker argument, naming the marker and the test.
    """
    from gradguard._config import GUARD_OPTIONS
    from gradguard._sources import from_values, unknown_names

    options = settings.given.guard_options()
    mode = str(options.pop("mode", "off"))
    marker = item.get_closest_marker("gradguard")
    marked: dict[str, object] = {}
    if marker is not None:
        where = f"@pytest.mark.gradguard on {item.nodeid}"
        kwargs = dict(marker.kwargs)
        try:
            if len(marker.args) > 1 or (marker.args and "mode" in kwargs):
                raise TypeError(f"{where} takes the mode once; got args {marker.args!r}")
            if marker.args:
                kwargs["mode"] = marker.args[0]
            unknown_names(kwargs, where, GUARD_OPTIONS)
            marked = from_values(
                kwargs,
                lambda o: f"@pytest.mark.gradguard({o.name}=...) on {item.nodeid}",
                "marker",
                options=GUARD_OPTIONS,
            ).values
        except (TypeError, ValueError) as exc:
            raise _BadSetting(f"gradguard: {exc}") from None
    if "mode" in marked:
        mode = str(marked.pop("mode"))
    elif FIXTURE in getattr(item, "fixturenames", ()):
        mode = "log"  # like recwarn: a test that inspects findings records them
    elif marker is not None and mode == "off":
        mode = "strict"
    if "ignore" in marked:  # a marker's codes add to the run's
        run_codes = cast("frozenset[str]", options.get("ignore", frozenset()))
        marked["ignore"] = run_codes | cast("frozenset[str]", marked["ignore"])
    return mode, {**options, **marked}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_SESSION] = None
    problem: str | None = None
    try:
        mode, options = _item_options(item, item.config.stash[_SETTINGS])
    except _BadSetting as exc:
        problem = str(exc)
    if problem is not None:  # failed outside the except block: pytest shows the message once
        pytest.fail(problem, pytrace=False)
    if mode == "off":
        return
    from gradguard._dispatch import validate_mode
    from gradguard._session import Session

    session = Session(validate_mode(mode), options=options)
    session.start()
    item.stash[_SESSION] = session


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, None]:
    outcome = yield
    session = item.stash.get(_SESSION, None)
    if session is None:
        return
    item.stash[_SESSION] = None
    try:
        # Closes the guards this test's session attached: the next test starts fresh.
        session.stop()
    except Exception as exc:  # a strict finding read back at close
        if outcome.excinfo is None and hasattr(outcome, "force_exception"):
            outcome.force_exception(exc)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    excinfo = call.excinfo
    if (
        excinfo is not None
        and "gradguard._guard" in sys.modules  # no guard, no finding's error
        and not item.config.getoption("fulltrace", False)
    ):
        _end_at_the_step(excinfo)
    yield


def _end_at_the_step(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """End a strict finding's traceback at the test's own ``optimizer.step()`` line.

    The frames after it, inside a library's optimizer wrapper, torch's step
    wrapper and gradguard's hooks, say nothing about the test: it ends at the
    line the finding names (`gradguard._naming.step_frames`). pytest rebuilds
    tracebacks from the raw ``tb_next`` chain, so the chain itself is cut.
    """
    from gradguard._exceptions import GradGuardError

    if not isinstance(excinfo.value, GradGuardError) or excinfo.value.finding is None:
        return
    from gradguard._naming import step_frames  # imports torch: only for a finding's error

    chain = []
    tb: types.TracebackType | None = excinfo.tb
    while tb is not None:
        chain.append(tb)
        tb = tb.tb_next
    keep = step_frames([t.tb_frame.f_code.co_filename for t in chain])
    if 0 < keep < len(chain):
        chain[keep - 1].tb_next = None
        excinfo.traceback = type(excinfo.traceback)(excinfo.tb)


class FindingsRecorder:
    """The findings of the running test, in the order first seen; like ``recwarn``.

    A test that requests the ``gradguard_findings`` fixture runs in mode
    ``log`` unless its marker sets a mode, so findings are recorded for the
    test to assert on instead of failing it.
    """

    def __init__(self, session: Session | None) -> None:
        self._session = session
        self._none: list[Finding] = []  # gradguard off for this test

    @property
    def _findings(self) -> list[Finding]:
        """The findings so far, with every device result still pending judged first
        (on CUDA a guard reads them a step or more later; a test asks now)."""
        if self._session is None:
            return self._none
        self._session.settle()
        return self._session.findings

    @property
    def findings(self) -> list[Finding]:
        """The findings so far (a copy)."""
        return list(self._findings)

    @property
    def codes(self) -> list[str]:
        """The codes of the findings so far, e.g. ``["GG102"]``."""
        return [f.code for f in self._findings]

    def __len__(self) -> int:
        return len(self._findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(list(self._findings))

    def __getitem__(self, index: int) -> Finding:
        return self._findings[index]

    def pop(self, code: str) -> Finding:
        """Remove and return the first finding with ``code``.

        Raises:
            AssertionError: no finding with that code was recorded.
            TypeError, ValueError: ``code`` is not a str, or not a finding code.
        """
        from gradguard._dispatch import validate_codes

        (wanted,) = validate_codes([code], "gradguard_findings.pop(code)")
        for i, finding in enumerate(self._findings):
            if finding.code == wanted:
                return self._findings.pop(i)
        raise AssertionError(f"no {wanted} finding was recorded; recorded: {self.codes}")

    def clear(self) -> None:
        """Forget the findings recorded so far."""
        self._findings.clear()


@pytest.fixture
def gradguard_findings(request: pytest.FixtureRequest) -> FindingsRecorder:
    """The current test's gradguard findings, for assertions (like ``recwarn``)."""
    return FindingsRecorder(request.node.stash.get(_SESSION, None))
