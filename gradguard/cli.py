"""The ``gradguard`` command: ``run`` a script with every optimizer guarded, ``report`` on a log.

``gradguard run``: the script runs as ``__main__`` exactly as ``python
script.py`` would run it: same ``sys.argv``, ``sys.path[0]``, ``__file__``,
tracebacks and exit code. gradguard writes only to stderr, so the script's
stdout is unchanged. The Python processes it starts are followed
(``gradguard._children``); in strict mode a finding in one of them makes the
run exit 1.

``gradguard report``: the summary table of one or more JSON-lines logs, and
optionally the gradient timeline as a picture.

Only ``run`` imports torch (through `gradguard._session`), and only once its
options are parsed: ``gradguard --help``, ``gradguard run --help`` and
``gradguard report`` start in a fraction of torch's import time.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import io
import os
import runpy
import sys
import traceback
import types
import zipfile
from collections.abc import Callable, Sequence
from importlib.machinery import SourceFileLoader
from typing import TYPE_CHECKING, NoReturn, cast

from gradguard import _plot
from gradguard._config import ENV_VAR, OPTIONS, Setting
from gradguard._exceptions import ERRORS, GradGuardError
from gradguard._report import (
    Record,
    ReportError,
    expand,
    load,
    report_text,
    wants_colour,
    width_for,
)
from gradguard._sources import (
    Given,
    from_environment,
    from_pyproject,
    from_text,
    layered,
    needs_log,
)
from gradguard._stderr import say

if TYPE_CHECKING:
    from gradguard._session import Session

_VALUE_OPTIONS = tuple(option.flag for option in OPTIONS if not option.boolean)

Runner = Callable[[], None]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr: what is wrong, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = _Parser(
        prog="gradguard",
        description="Catch gradient-handling bugs in PyTorch training loops while they run.",
    )
    from gradguard import __version__

    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a script or module with every optimizer guarded",
        description=(
            "Run a Python script (or -m module) as python would, with every "
            "torch.optim.Optimizer it steps guarded. Options go before the script; "
            "everything after it is the script's own sys.argv. Each option can also be "
            f"set by [tool.gradguard] in pyproject.toml or by {ENV_VAR}_<OPTION> "
            f"({ENV_VAR} for the mode); the command line wins over both."
        ),
        usage="gradguard run [options] (script.py | -m module) [args ...]",
    )
    for option in OPTIONS:
        text = option.help
        if option.name == "mode":
            text += f" (default: the {ENV_VAR} environment variable, else warn)"
        if option.boolean:
            run.add_argument(option.flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            run.add_argument(option.flag, metavar=option.metavar, help=text)
    run.add_argument(
        "--verbose", action="store_true", help="print the summary even when nothing was found"
    )
    run.add_argument("-m", dest="module", metavar="module", help="run a library module as a script")
    run.add_argument("script", nargs="?", help="the script to run")
    run.add_argument("args", nargs="*", help="the script's own arguments")
    report = sub.add_parser(
        "report",
        help="summarise JSON-lines logs as a table, and plot the gradient timeline",
        description=(
            "Print the findings of one or more gradguard JSON-lines logs (one per rank, "
            "merged) as a table: code, name, count, first step, first location, "
            "parameters and the fix."
        ),
    )
    report.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="JSON-lines logs written by --log-json; a quoted glob such as 'run-*.jsonl' works",
    )
    report.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw the gradient norms per step, with each finding marked, to this file "
        '(needs matplotlib: pip install "gradguard[plot]")',
    )
    return parser, run, report


def _split(tokens: list[str]) -> tuple[list[str], str | None, str | None, list[str]]:
    """Split ``run``'s arguments into gradguard's options and the target with its argv.

    Like python itself, the first argument that is not an option (or the one
    after ``-m``) ends gradguard's options: ``gradguard run train.py --mode x``
    passes ``--mode x`` to train.py.
    """
    options: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            rest = tokens[i + 1 :]
            return options, (rest[0] if rest else None), None, rest[1:]
        if tok == "-m" and i + 1 < len(tokens):
            return options, None, tokens[i + 1], tokens[i + 2 :]
        if tok.startswith("-m") and not tok.startswith("--") and len(tok) > 2:
            return options, None, tok[2:], tokens[i + 1 :]
        if tok.startswith("-") and tok != "-":
            options.append(tok)
            if tok in _VALUE_OPTIONS and i + 1 < len(tokens):
                options.append(tokens[i + 1])
                i += 1
            i += 1
            continue
        return options, tok, None, tokens[i + 1 :]
    return options, None, None, []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command; returns the exit status."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    parser, run_parser, report_parser = _parsers()
    if tokens and tokens[0] == "report":
        return _report(report_parser.parse_args(tokens[1:]))
    if not tokens or tokens[0] != "run":
        parser.parse_args(tokens)  # --help, --version, or a usage error
        parser.print_usage(sys.stderr)
        return 2
    option_tokens, script, module, rest = _split(tokens[1:])
    opts = run_parser.parse_args(option_tokens)
    if script is None and module is None:
        run_parser.error("give a script to run, or -m module")
    try:
        given = _settings(opts)
    except (TypeError, ValueError) as exc:
        run_parser.error(str(exc))
    mode = cast(Setting, given.values.get("mode", "warn"))  # checked

    # --help and the usage errors, all but a log file that cannot be created,
    # have exited by now: they never wait for torch to import.
    from gradguard._session import Session, leave_parent_run

    # A run started inside a followed process is a run of its own.
    leave_parent_run()
    try:
        options = given.guard_options()
        options.pop("mode", None)
        session = (
            None
            if mode == "off"
            else Session(
                mode,
                options=options,
                log_json=given.values.get("log_json"),
                log_source=given.where.get("log_json", "--log-json"),
                verbose=opts.verbose,
                follow=True,
            )
        )
    except (TypeError, ValueError) as exc:
        run_parser.error(str(exc))

    runner = _prepare_module(module, rest) if module is not None else _prepare_path(script, rest)
    if isinstance(runner, int):
        if session is not None:
            session.stop()
        return runner
    return _execute(runner, session, mode)


def _settings(opts: argparse.Namespace) -> Given:
    """The run's options: ``[tool.gradguard]``, then the environment, then the flags.

    Raises:
        TypeError, ValueError: a bad value, naming where it came from.
    """
    flags = {o.name: getattr(opts, o.name) for o in OPTIONS if getattr(opts, o.name) is not None}
    given = layered(
        from_pyproject(os.getcwd()),
        from_environment(os.environ),
        from_text(flags, lambda o: o.flag, "command line"),
    )
    needs_log(given, "--log-json PATH")
    return given


def _report(opts: argparse.Namespace) -> int:
    """``gradguard report``: print the table to stdout; draw the timeline if asked."""
    if opts.plot is not None:
        if _plot.load_pyplot() is None:
            print(
                f"gradguard report: --plot needs matplotlib; install it with: {_plot.INSTALL_HINT}",
                file=sys.stderr,
            )
            return 2
        problem = _plot_path_problem(opts.plot)
        if problem is not None:
            print(f"gradguard report: {problem}", file=sys.stderr)
            return 2
    try:
        run = load(expand(opts.paths))
    except ReportError as exc:
        print(f"gradguard report: {exc}", file=sys.stderr)
        return 2
    colour, width = wants_colour(sys.stdout), width_for(sys.stdout)
    print(report_text(run, colour=colour, width=width, plotting=opts.plot is not None))
    if opts.plot is not None:
        if not run.norms:
            print(
                "gradguard report: no gradient norms in the log to plot; record them with "
                "gradguard run --record-norms --log-json PATH (or record_norms=True)",
                file=sys.stderr,
            )
            return 1
        try:
            _plot.timeline(run, opts.plot)
        except OSError as exc:
            print(f"gradguard report: cannot write --plot {opts.plot!r}: {exc}", file=sys.stderr)
            return 1
        print(f"timeline written to {opts.plot}")
    return 0


def _plot_path_problem(path: str) -> str | None:
    """Why ``--plot PATH`` cannot name the picture to write, or ``None``."""
    if not path:
        return "--plot must be a non-empty file path such as timeline.png; got ''"
    if os.path.isdir(path):
        return f"--plot must be a file path such as timeline.png, not a directory; got {path!r}"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return (
            f"--plot must be a file path in an existing directory; got {path!r}, "
            f"and directory {directory!r} does not exist: create it first"
        )
    return None


def _execute(runner: Runner, session: Session | None, mode: str) -> int:
    """Run the script; return its exit status, or 1 for a strict finding in any process.

    A strict finding in a followed child fails the run even when the script
    ignored that child's exit status; a script's own non-zero status stays.
    """
    if session is not None:
        session.start()
    try:
        runner()
    except SystemExit as exc:
        late = _finish(session)
        if late is not None:
            _print_strict(late, mode)
            return 1
        if session is not None and session.child_strict is not None and exc.code in (0, None):
            _print_child_strict(session.child_strict, mode)
            return 1
        raise
    except KeyboardInterrupt as exc:
        late = _finish(session)
        if late is None:
            # Re-raised so the interpreter exits as python would (killed by
            # SIGINT); it prints the traceback through sys.excepthook.
            _report_at_exit(exc)
            raise
        _print_strict(late, mode)
        return 1
    except GradGuardError as exc:
        if exc.finding is None:  # gradguard's own failure, not a finding
            _finish(session)
            _print_exception(exc)
            return 1
        _finish(session, summary=False)
        _print_strict(exc, mode)
        return 1
    except BaseException as exc:
        _finish(session)
        _print_exception(exc)
        return 1
    late = _finish(session)
    if late is not None:
        _print_strict(late, mode)
        return 1
    if session is not None and session.child_strict is not None:
        _print_child_strict(session.child_strict, mode)
        return 1
    return 0


def _finish(session: Session | None, summary: bool = True) -> GradGuardError | None:
    """Close the session and print its summary; return a strict finding made at close.

    The summary comes before anything else the runner prints, so a traceback
    or a strict finding stays the last thing on stderr.
    """
    if session is None:
        return None
    late = None
    try:
        session.stop()
    except GradGuardError as exc:  # a device-side verdict read back at close
        late = exc
    if summary and late is None:
        session.print_summary()
    return late


def _user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The frames of ``tb`` below the runner's, those python itself would show.

    Under ``-m``, and for a directory or zip, they start in runpy, as python's do.
    """
    start = tb
    while tb is not None:
        if tb.tb_frame.f_code in _RUNNER_CODES:
            return tb.tb_next
        tb = tb.tb_next
    return start


def _print_exception(exc: BaseException) -> None:
    """Report an exception the script did not catch, as the interpreter would."""
    # The default hook prints exc.__traceback__, whatever tb it is passed.
    tb = _user_traceback(exc.__traceback__)
    sys.excepthook(type(exc), exc.with_traceback(tb), tb)


def _report_at_exit(exc: BaseException) -> None:
    """Have the interpreter's report of ``exc``, which leaves the runner, show the user's frames.

    The hook in place then (the script's own, if it set one) is called once,
    with the traceback cut as `_print_exception` cuts it.
    """
    hook = sys.excepthook

    def report(
        kind: type[BaseException], value: BaseException, tb: types.TracebackType | None
    ) -> None:
        sys.excepthook = hook
        if value is exc:
            tb = _user_traceback(tb)
            value = value.with_traceback(tb)
        hook(kind, value, tb)

    sys.excepthook = report


def _print_strict(exc: GradGuardError, mode: str) -> None:
    """Report a strict-mode finding: the user's frames, then the finding's message last."""
    from gradguard._naming import step_frames  # imports torch, which the run has imported

    frames = traceback.extract_tb(_user_traceback(exc.__traceback__))
    # The frames inside a library's optimizer wrapper, torch's step wrapper and
    # gradguard's hooks say nothing about the user's loop; the traceback ends
    # at the line the finding names, their optimizer.step().
    del frames[step_frames([frame.filename for frame in frames]) :]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines.append(f"{name} (mode={mode}: the first finding stops the script; use --mode warn):\n")
    message = exc.finding.message if exc.finding is not None else str(exc)
    lines.append(message)
    say("".join(lines))


def _print_child_strict(rec: Record, mode: str) -> None:
    """Report a strict-mode finding a child raised: the finding's message last."""
    error = ERRORS.get(str(rec.get("code")), GradGuardError)
    say(
        f"gradguard.{error.__qualname__} in child process {rec.get('pid')} "
        f"(mode={mode}: a finding in a child process fails the run; use --mode warn):\n"
        f"{rec.get('message')}"
    )


def _prepare_path(path: str | None, args: list[str]) -> Runner | int:
    """Set up ``sys`` for ``python path args...`` and return what runs it, or an exit code."""
    assert path is not None
    sys.argv = [path, *args]
    if os.path.isdir(path) or zipfile.is_zipfile(path):
        # A directory or zip with __main__.py: python puts it first on sys.path
        # and imports __main__ from it.
        _set_path0(os.path.join(os.getcwd(), path))
        return functools.partial(_run_as_main, "__main__", alter_argv=False)
    filename = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    try:
        with io.open_code(filename) as f:
            source = f.read()
    except OSError as exc:
        print(f"gradguard run: can't open file {filename!r}: {exc}", file=sys.stderr)
        return 2
    _set_path0(os.path.dirname(os.path.realpath(filename)))
    return functools.partial(_run_source, source, filename)


def _prepare_module(name: str, args: list[str]) -> Runner:
    """Set up ``sys`` for ``python -m name args...`` and return what runs it.

    A module that is not there, or a package that fails to import, is
    reported as python reports it, from inside the run.
    """
    sys.argv = [name, *args]  # runpy replaces [0] with the module's file
    _set_path0(os.getcwd())
    return functools.partial(_run_as_main, name, alter_argv=True)


def _run_source(source: bytes, filename: str) -> None:
    """Run a script's source as ``__main__``, as ``python script.py`` does."""
    code = compile(source, filename, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__file__ = filename
    module.__cached__ = None  # type: ignore[attr-defined]
    module.__loader__ = SourceFileLoader("__main__", filename)
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def _run_as_main(name: str, *, alter_argv: bool) -> None:
    """Run a module, or a directory's or zip's ``__main__``, in a fresh ``__main__``.

    Through the very function ``python -m`` and ``python dir`` call, so the
    run, its errors and its tracebacks are theirs.
    """
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = module
    runpy._run_module_as_main(name, alter_argv)  # type: ignore[attr-defined]


# The runner's frame is the last before the user's: a traceback starts after it.
_RUNNER_CODES = frozenset({_run_source.__code__, _run_as_main.__code__})


def _set_path0(entry: str) -> None:
    """Put ``entry`` where python puts the script's directory, replacing the runner's."""
    if sys.path:
        sys.path[0] = entry
    else:
        sys.path.insert(0, entry)
