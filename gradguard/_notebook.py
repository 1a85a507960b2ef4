"""The IPython extension: ``%load_ext gradguard`` and the ``%gradguard`` line magic.

Loading it installs process-wide guarding in warn mode (the session of
`gradguard.install`), so every optimizer a cell steps is guarded from its first
step on. A finding is shown while the cell that ran the step runs, so it lands
in that cell's output, and it names the cell as IPython's tracebacks do
(``cell In[3]:5``, through `CODE_NAMES`). When a cell ends, what the device
still computes about its steps is judged, so on a GPU too a finding shows
under the cell that caused it. ``%gradguard summary`` counts every finding
since the extension was loaded, across mode changes.

IPython passes the shell in: nothing here imports IPython except the magic,
which only IPython runs, for its usage error.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

from gradguard._config import SETTINGS, parse_setting
from gradguard._dispatch import SinkHandle, add_sink
from gradguard._exceptions import GradGuardError, GradGuardWarning
from gradguard._findings import Finding
from gradguard._naming import CODE_NAMES
from gradguard._process import keep
from gradguard._report import plural
from gradguard._session import Session, format_summary, install_quietly, installed, stop_installed
from gradguard._stderr import say
from gradguard._tally import Tally

if TYPE_CHECKING:
    import torch
    from IPython.core.interactiveshell import ExecutionResult, InteractiveShell
    from torch.utils.hooks import RemovableHandle

MAGIC = "gradguard"
COMMANDS = ("summary", "status")
"""What ``%gradguard`` takes besides a mode; with nothing, it shows the status."""
MODES = " | ".join(SETTINGS)


class Notebook:
    """The extension loaded in one shell: its magic, its cell names, its count of findings."""

    def __init__(self, shell: InteractiveShell) -> None:
        self._shell = shell
        self._tally = Tally()
        self._handles: list[SinkHandle | RemovableHandle] = []
        # Optimizers stepped in the sessions replaced so far, counted once each:
        # how many, and those still alive, which the session running may count again.
        self._counted = 0
        self._carried: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._session: Session | None = None  # the session the extension installed

    def open(self) -> None:
        """Start guarding in warn mode and register the magic, the cell names and the hook."""
        self._handles.append(add_sink(self._on_finding))
        self._handles.append(CODE_NAMES.add(self._cell_name))
        self._shell.events.register("post_run_cell", self._after_cell)
        self._shell.magics_manager.register_function(
            self.magic, magic_kind="line", magic_name=MAGIC
        )
        running = installed()
        if running is None:
            try:
                self._switch("warn")
            except BaseException:
                self.close()
                raise
        mode = "warn" if running is None else running.mode  # an `install()` of yours stays
        print(
            f"gradguard: guarding every optimizer this notebook steps (mode={mode}); "
            f"%{MAGIC} {MODES} sets the mode, %{MAGIC} summary lists the findings"
        )

    def close(self) -> None:
        """Stop the session the extension started, if it still runs, and remove what `open` added.

        A session started by your own `gradguard.install` keeps running.
        """
        try:
            if self._session is not None and installed() is self._session:
                self._settle(self._session)
                stop_installed()
        finally:
            self._session = None
            for handle in reversed(self._handles):
                handle.remove()
            self._handles.clear()
            with contextlib.suppress(ValueError):  # never registered: `open` failed first
                self._shell.events.unregister("post_run_cell", self._after_cell)
            self._shell.magics_manager.magics["line"].pop(MAGIC, None)

    # -- the magic ---------------------------------------------------------------

    def magic(self, line: str) -> None:
        """``%gradguard [warn | strict | log | off | summary | status]``.

        A mode starts guarding in that mode from the next step on (``off``
        stops it), as `gradguard.install` would; ``summary`` prints every
        finding since the extension was loaded; nothing, or ``status``, says
        what is on.
        """
        words = line.split()
        command = words[0].lower() if len(words) == 1 else line.strip()
        if command in ("", "status"):
            print(self.status())
        elif command == "summary":
            print(self.summary())
        elif command in SETTINGS:
            running = installed()
            if (running.mode if running is not None else "off") != command:
                self._switch(parse_setting(command, f"%{MAGIC}"))
            print(self.status())
        else:
            from IPython.core.error import UsageError

            choices = " | ".join((*SETTINGS, *COMMANDS))
            raise UsageError(f"%{MAGIC} takes one of {choices}, or nothing; got {line.strip()!r}")

    def status(self) -> str:
        """One line: the mode, and how many optimizers and findings so far."""
        session = installed()
        found = sum(self._tally.counts.values())
        so_far = f"{plural(self._optimizers(), 'optimizer')} watched, {plural(found, 'finding')}"
        if session is None:
            return f"gradguard: off, nothing is guarded ({so_far}); %{MAGIC} warn turns it on"
        return (
            f"gradguard: mode={session.mode}, guarding every optimizer this notebook steps "
            f"({so_far}; %{MAGIC} summary lists them)"
        )

    def summary(self) -> str:
        """The summary table of every finding since the extension was loaded."""
        session = installed()
        if session is not None:
            self._settle(session)
        return format_summary(
            self._tally.rows(),
            "off" if session is None else session.mode,
            self._optimizers(),
            verbose=True,
        )

    # -- sessions ----------------------------------------------------------------

    def _switch(self, setting: str) -> None:
        """Replace the session running, if any, with one in ``setting``."""
        current = installed()
        if current is not None:
            self._settle(current)  # its pending findings, in its own mode
            self._carry(current)
        install_quietly(setting)
        self._session = installed()

    def _carry(self, session: Session) -> None:
        """Count the optimizers ``session`` watched, before it is replaced."""
        watched = session.watched()
        again = sum(1 for opt in watched if opt in self._carried)
        self._counted += session.optimizers - again
        self._carried.update(watched)

    def _optimizers(self) -> int:
        """How many optimizers stepped while the extension was loaded, each counted once."""
        session = installed()
        if session is None:
            return self._counted
        again = sum(1 for opt in session.watched() if opt in self._carried)
        return self._counted + session.optimizers - again

    @staticmethod
    def _settle(session: Session) -> None:
        """Judge what the device still computes; a strict finding is shown, not raised.

        Outside a cell's own code there is nothing left to stop: the cell has
        run, and raising here would only be IPython's "error in callback".
        """
        try:
            session.settle()
        except (GradGuardError, GradGuardWarning) as exc:
            say(f"{type(exc).__name__}: {exc}")

    # -- IPython's and gradguard's callbacks -------------------------------------

    def _on_finding(self, finding: Finding, first: bool) -> None:
        self._tally.add(finding)

    def _after_cell(self, result: ExecutionResult) -> None:
        """After each cell: its steps' findings still on the device show under it."""
        session = installed()
        if session is not None:
            try:
                self._settle(session)
            except Exception as exc:  # never break the notebook
                say(f"gradguard: {type(exc).__name__}: {exc}")

    def _cell_name(self, filename: str) -> str | None:
        """``cell In[3]`` for the code of the cell run third, as IPython's tracebacks say it."""
        format_code_name = getattr(self._shell.compile, "format_code_name", None)
        named = format_code_name(filename) if format_code_name is not None else None
        if not named:
            return None
        label, name = named
        return f"{label.lower()} {name}"


class _Loaded:
    """The extension loaded in this process, if any."""

    def __init__(self) -> None:
        self.notebook: Notebook | None = None

    def clear(self) -> None:
        notebook, self.notebook = self.notebook, None
        if notebook is not None:
            notebook.close()

    def __len__(self) -> int:
        return int(self.notebook is not None)


_LOADED = keep("notebook extension", _Loaded())


def load(shell: InteractiveShell) -> None:
    """``%load_ext gradguard``: guard the notebook's optimizers and add ``%gradguard``."""
    _LOADED.clear()  # loaded again into another shell: one extension per process
    notebook = Notebook(shell)
    _LOADED.notebook = notebook
    notebook.open()


def unload(shell: InteractiveShell) -> None:
    """``%unload_ext gradguard``: stop guarding and remove ``%gradguard``."""
    _LOADED.clear()
