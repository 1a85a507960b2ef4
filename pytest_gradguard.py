"""pytest plugin: run a test suite with every optimizer guarded.

Registered through the ``pytest11`` entry point, so every pytest run in an
environment with gradguard loads it. It lives outside the ``gradguard``
package so that loading it imports nothing of gradguard's: until a test asks
for gradguard (``--gradguard``, the ``gradguard`` ini key, ``GRADGUARD``, the
marker or the ``gradguard_findings`` fixture) nothing here imports gradguard
or torch.

Precedence for the mode: marker > command line > environment > ini > off.
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from gradguard._findings import Finding
    from gradguard._session import Session

_T = TypeVar("_T")

MODES = ("strict", "warn", "log", "off")
ENV_VAR = "GRADGUARD"
FIXTURE = "gradguard_findings"

MODE_HELP = (
    "gradguard mode for every test: strict (a finding fails the test), warn (findings "
    "appear in the warnings summary), log (log events only) or off (the default). "
    "@pytest.mark.gradguard(mode=...) overrides it per test; the command line wins "
    "over the GRADGUARD environment variable, which wins over the ini value."
)
IGNORE_HELP = "gradguard finding codes never reported, e.g. GG103 or GG101,GG103"
LOG_JSON_HELP = (
    "file for one JSON object per gradguard finding per line, created when the run "
    "starts; {rank} becomes the process's rank"
)
MARKER_HELP = (
    "gradguard(mode=None, ignore=()): run this test with gradguard in mode strict, warn, "
    "log or off (default: the run's mode, strict if that is off), also ignoring these codes"
)


@dataclass(frozen=True)
class Settings:
    """The run's gradguard configuration and where its mode came from."""

    mode: str
    source: str
    ignore: tuple[str, ...]
    ignore_source: str
    log_json: str | None
    log_source: str


_SETTINGS: pytest.StashKey[Settings] = pytest.StashKey()
_LOG: pytest.StashKey[Any] = pytest.StashKey()
_SESSION: pytest.StashKey[Session | None] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradguard", "catch gradient-handling bugs in PyTorch training loops")
    group.addoption("--gradguard", metavar="MODE", default=None, help=MODE_HELP)
    parser.addini("gradguard", MODE_HELP)
    group.addoption("--gradguard-ignore", metavar="CODES", default=None, help=IGNORE_HELP)
    parser.addini("gradguard_ignore", IGNORE_HELP)
    group.addoption("--gradguard-log-json", metavar="PATH", default=None, help=LOG_JSON_HELP)
    parser.addini("gradguard_log_json", LOG_JSON_HELP)


class _BadSetting(ValueError):
    """A gradguard setting with a bad value; the message names where it came from."""


def _validate_mode(value: object, where: str) -> str:
    """``value`` as a mode; a bad one gets the error gradguard gives it anywhere."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    from gradguard._config import parse_setting  # only a bad value pays; torch stays out

    return _canonical(parse_setting, value, where)


def _split_codes(value: object, where: str) -> tuple[str, ...]:
    """Codes from ``"GG101,GG103"`` or a list, checked for shape; the catalogue is checked later.

    A value of the wrong shape gets the error gradguard gives it anywhere.
    """
    if isinstance(value, str):
        items: list[object] = [c for c in re.split(r"[\s,]+", value) if c]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if isinstance(value, (str, list, tuple)) and all(
        isinstance(code, str) and re.fullmatch(r"GG\d{3}", code.upper()) for code in items
    ):
        return tuple(str(c).upper() for c in items)
    from gradguard._dispatch import validate_codes

    return tuple(sorted(_canonical(validate_codes, value, where)))


def _canonical(check: Callable[[object, str], _T], value: object, where: str) -> _T:
    """``check(value, where)``, its TypeError or ValueError turned into a usage error."""
    try:
        return check(value, where)
    except (TypeError, ValueError) as exc:
        raise _BadSetting(f"gradguard: {exc}") from None


def _settings(config: pytest.Config) -> Settings:
    """Resolve the run's settings: command line > environment > ini > default."""
    cli = config.getoption("gradguard")
    env = os.environ.get(ENV_VAR, "").strip()
    ini = config.getini("gradguard")
    if cli is not None:
        mode, source = _validate_mode(cli, "the --gradguard option"), "command line"
    elif env:
        mode, source = _validate_mode(env, f"the {ENV_VAR} environment variable"), "environment"
    elif ini:
        mode, source = _validate_mode(ini, "ini option gradguard"), "ini"
    else:
        mode, source = "off", "default"

    ignore_cli = config.getoption("gradguard_ignore")
    if ignore_cli is not None:
        ignore_source = "the --gradguard-ignore option"
        ignore = _split_codes(ignore_cli, ignore_source)
    else:
        ignore_source = "ini option gradguard_ignore"
        ignore = _split_codes(config.getini("gradguard_ignore") or "", ignore_source)

    log_json = config.getoption("gradguard_log_json")
    log_source = "the --gradguard-log-json option"
    if log_json is None:
        log_source = "ini option gradguard_log_json"
        ini_log = config.getini("gradguard_log_json")
        if ini_log:
            # Relative to the ini file, like pytest's own path settings.
            base = config.inipath.parent if config.inipath else config.rootpath
            log_json = os.path.join(str(base), str(ini_log))
    return Settings(mode, source, ignore, ignore_source, log_json, log_source)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        settings = _settings(config)
        if settings.mode != "off" and settings.ignore:
            # Only a run that uses gradguard pays for importing it.
            _check_codes(settings.ignore, settings.ignore_source)
    except _BadSetting as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_SETTINGS] = settings
    if settings.log_json is not None:
        from gradguard._dispatch import add_record_sink, add_sink
        from gradguard._jsonlog import JsonLog

        try:
            log = JsonLog(settings.log_json, settings.log_source)
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


def _check_codes(codes: tuple[str, ...], where: str) -> frozenset[str]:
    """Check ``codes`` against the catalogue; imports gradguard, not torch."""
    from gradguard._dispatch import validate_codes

    return _canonical(validate_codes, codes, where)


def pytest_report_header(config: pytest.Config) -> str | None:
    settings = config.stash[_SETTINGS]
    if settings.mode == "off" and not settings.log_json:
        return None
    parts = [f"mode={settings.mode} (from {settings.source})"]
    if settings.ignore:
        parts.append(f"ignore={','.join(settings.ignore)}")
    if settings.log_json:
        parts.append(f"log-json={settings.log_json}")
    return "gradguard: " + ", ".join(parts)


def _item_mode(item: pytest.Item, settings: Settings) -> tuple[str, frozenset[str]]:
    """This test's mode and ignored codes: marker, then the fixture, then the run's.

    The codes are checked against the catalogue only when the test runs guarded.
    """
    mode = settings.mode
    marker = item.get_closest_marker("gradguard")
    marked = None
    marked_ignore: tuple[str, ...] = ()
    ignore_source = f"@pytest.mark.gradguard(ignore=...) on {item.nodeid}"
    if marker is not None:
        where = f"@pytest.mark.gradguard on {item.nodeid}"
        unknown = set(marker.kwargs) - {"mode", "ignore"}
        if unknown or len(marker.args) > 1:
            raise _BadSetting(
                f"gradguard: {where} takes mode= and ignore=; got "
                f"args {marker.args!r}, kwargs {sorted(marker.kwargs)!r}"
            )
        given = marker.kwargs.get("mode", marker.args[0] if marker.args else None)
        if given is not None:
            marked = _validate_mode(given, f"@pytest.mark.gradguard(mode=...) on {item.nodeid}")
        marked_ignore = _split_codes(marker.kwargs.get("ignore", ()), ignore_source)
    if marked is not None:
        mode = marked
    elif FIXTURE in getattr(item, "fixturenames", ()):
        mode = "log"  # like recwarn: a test that inspects findings records them
    elif marker is not None and mode == "off":
        mode = "strict"
    if mode == "off":
        return mode, frozenset()
    codes = _check_codes(settings.ignore, settings.ignore_source)
    return mode, codes | _check_codes(marked_ignore, ignore_source)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_SESSION] = None
    problem: str | None = None
    try:
        mode, codes = _item_mode(item, item.config.stash[_SETTINGS])
    except _BadSetting as exc:
        problem = str(exc)
    if problem is not None:  # failed outside the except block: pytest shows the message once
        pytest.fail(problem, pytrace=False)
    if mode == "off":
        return
    from gradguard._dispatch import validate_mode
    from gradguard._session import Session

    session = Session(validate_mode(mode), ignore=codes)
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
        and "gradguard" in sys.modules
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
