"""The gradient timeline: norms per step on a log scale, with each finding marked at its step.

Each step shows the norm it applied and, where a clip or a clear came between,
the norm backward produced for it: the tutorial's loop that clears between
backward and step produces gradients and applies none.

matplotlib is an optional extra (``pip install "gradguard[plot]"``); it is
imported only here, only when a plot is asked for, and drawn off-screen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gradguard._report import Record, Run

INSTALL_HINT = 'pip install "gradguard[plot]"'
# Module lines avoid the red and orange that mark findings.
_MODULE_COLOURS = ("C0", "C2", "C4", "C5", "C6", "C7", "C8", "C9", "C0")
_LEVEL_COLOURS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
_SIZE = (9.0, 3.6)  # inches per optimizer, at _DPI
_DPI = 100


def load_pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on a non-interactive backend, or ``None`` if not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


class _Series:
    """One optimizer's norms: the total applied, backward's, and each module's, by step."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.total: list[float] = []
        self.produced: list[float] = []
        self.nothing: list[int] = []  # steps that applied no gradient at all
        self.modules: dict[str, dict[int, float]] = {}

    def add(self, rec: Record) -> None:
        step = rec.get("step")
        if not isinstance(step, int):
            return
        self.steps.append(step)
        self.total.append(_value(rec.get("total")))
        self.produced.append(_value(rec.get("produced")))
        if rec.get("total") == 0:
            self.nothing.append(step)
        modules = rec.get("modules")
        for name, norm in (modules if isinstance(modules, dict) else {}).items():
            self.modules.setdefault(str(name), {})[step] = _value(norm)

    def total_at(self, step: int) -> float:
        """The norm the step applied; where it applied nothing, the one backward produced."""
        for s, v, made in zip(self.steps, self.total, self.produced, strict=True):
            if s == step:
                return v if math.isfinite(v) else made
        return math.nan

    @property
    def differs(self) -> bool:
        """Whether backward produced, at some step, other than what the step applied."""
        return any(
            a != b and (math.isfinite(a) or math.isfinite(b))
            for a, b in zip(self.total, self.produced, strict=True)
        )


def _value(norm: object) -> float:
    """A norm as a float; ``null`` (not finite) and non-positive ones are gaps on a log axis."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0:
        return float(norm)
    return math.nan


def _series(run: Run) -> dict[str, _Series]:
    """Per panel (see `_namer`), the norms of the lowest rank that recorded them, by step."""
    chosen = _lowest_rank(run)
    name = _namer(chosen)
    out: dict[str, _Series] = {}
    for rec in sorted(chosen, key=lambda r: r.get("step", 0)):
        out.setdefault(name(rec), _Series()).add(rec)
    return out


def _lowest_rank(run: Run) -> list[Record]:
    """Per optimizer, the norm records of the lowest rank that recorded them.

    After DistributedDataParallel's all-reduce every rank applies the same
    gradients, so one rank's line stands for all of them.
    """
    lowest: dict[str, int] = {}
    for rec in run.norms:
        opt, rank = str(rec.get("optimizer", "")), rec.get("rank", 0)
        if isinstance(rank, int):
            lowest[opt] = min(rank, lowest.get(opt, rank))
    return [r for r in run.norms if r.get("rank", 0) == lowest.get(str(r.get("optimizer", "")))]


def _namer(norms: list[Record]) -> Callable[[Record], str]:
    """A record's panel: its optimizer, and its pid where several processes share that label.

    Followed child processes (hogwild workers) number their optimizers alike.
    """
    pids: dict[str, set[object]] = {}
    for rec in norms:
        pids.setdefault(str(rec.get("optimizer", "")), set()).add(rec.get("pid"))

    def name(rec: Record) -> str:
        opt = str(rec.get("optimizer", ""))
        return opt if len(pids.get(opt, ())) <= 1 else f"{opt} (pid {rec.get('pid')})"

    return name


def timeline(run: Run, path: str) -> None:
    """Draw ``run``'s recorded norms to ``path`` (PNG): one panel per optimizer.

    The total norm is the thick black line, each top-level module a thin
    one; each finding is a marker at its step, labelled with its code (at the
    top of the panel when the step's norm is not finite).

    Raises:
        RuntimeError: matplotlib is not installed.
        ValueError: ``run`` holds no norms.
    """
    plt = load_pyplot()
    if plt is None:
        raise RuntimeError(
            f"the gradient timeline needs matplotlib; install it with: {INSTALL_HINT}"
        )
    series = _series(run)
    if not series:
        raise ValueError("no gradient norms were recorded in this log")
    name_of = _namer(_lowest_rank(run))
    names = sorted(series)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(_SIZE[0], _SIZE[1] * len(names)), squeeze=False
    )
    try:
        for ax, name in zip(axes[:, 0], names, strict=True):
            _panel(ax, name, series[name], [f for f in run.findings if name_of(f) == name])
        fig.tight_layout()
        fig.savefig(path, dpi=_DPI, format="png")
    finally:
        plt.close(fig)


def _panel(ax: Any, name: str, series: _Series, findings: list[Record]) -> None:
    # The total under the modules: a module that makes up most of it stays visible.
    differs = series.differs  # a clip or a clear came between backward and the step
    label = "applied by step()" if differs else "total"
    ax.plot(series.steps, series.total, color="black", linewidth=2.5, label=label, zorder=2)
    if differs:
        ax.plot(
            series.steps,
            series.produced,
            color="black",
            linestyle="--",
            linewidth=1.5,
            label="produced by backward()",
            zorder=2,
        )
    if series.nothing:  # no norm to draw on a log scale: a mark at the bottom
        ax.plot(
            series.nothing,
            [0.04] * len(series.nothing),
            transform=ax.get_xaxis_transform(),
            linestyle="none",
            marker="x",
            markersize=4,
            color="black",
            label="step() applied nothing",
            zorder=2,
        )
    for i, (module, values) in enumerate(series.modules.items()):
        steps = sorted(values)
        ax.plot(
            steps,
            [values[s] for s in steps],
            color=_MODULE_COLOURS[i % len(_MODULE_COLOURS)],
            linewidth=1.2,
            label=f"module {module}" if module.isdigit() else module,  # nn.Sequential's
            zorder=3,
        )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"{name}: gradient norm per step", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    stacked: dict[int, int] = {}
    seen: set[tuple[str, int]] = set()
    for rec in sorted(findings, key=lambda r: (r.get("step", 0), str(r.get("code")))):
        step, code = rec.get("step"), str(rec.get("code"))
        if not isinstance(step, int) or (code, step) in seen:
            continue  # the same finding from several ranks is one marker
        seen.add((code, step))
        colour = _LEVEL_COLOURS.get(str(rec.get("level")), "#7f7f7f")
        height = stacked[step] = stacked.get(step, -1) + 1
        ax.axvline(step, color=colour, linestyle=":", linewidth=1.0, zorder=1)
        y = series.total_at(step)
        if math.isfinite(y):
            point, transform = (step, y), ax.transData
        else:  # a NaN or Inf step: mark it at the top of the panel
            point, transform = (step, 0.92), ax.get_xaxis_transform()
        ax.plot(*point, transform=transform, marker="o", markersize=7, color=colour, zorder=4)
        ax.annotate(
            code,
            point,
            xycoords=transform,
            xytext=(4, 6 + 11 * height),
            textcoords="offset points",
            color=colour,
            fontsize=9,
            fontweight="bold",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
            zorder=5,
        )
    low, high = ax.get_ylim()
    if 0 < low < high:  # head room for the labels, on a log scale
        ax.set_ylim(low, high * (high / low) ** 0.2)
    ax.legend(loc="best", fontsize=8, ncol=min(5, 1 + len(series.modules)))
