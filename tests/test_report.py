"""``gradguard report`` and the runner's exit summary: one table, from one log or several."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import table
from loops import step_lineno, train

import gradguard
from gradguard._report import render_table, wants_colour
from gradguard._tally import SummaryRow
from gradguard.cli import main

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HEADER = ["code", "name", "count", "first step", "first location", "parameters"]


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    gradguard.uninstall()


def _log(path: Path, *, steps: int, monkeypatch: pytest.MonkeyPatch, rank: int = 0) -> None:
    """Run the tutorial's bug for ``steps`` steps as process ``rank`` logging to ``path``."""
    monkeypatch.setenv("RANK", str(rank))
    gradguard.install(mode="log", log_json=path)
    train(bug=True, steps=steps)
    gradguard.uninstall()


def test_report_prints_the_same_table_as_the_exit_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report of a log is the table uninstall() printed for that run, title aside."""
    path = tmp_path / "run.jsonl"
    _log(path, steps=4, monkeypatch=monkeypatch)
    at_exit = capsys.readouterr().err
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gradguard: 4 findings in {path}\n\n")
    assert table(out) == table(at_exit)
    header, row, lines, lines_continued, fix, *fix_continued = table(out)
    assert re.split(r"  +", header) == HEADER
    # The user's lines the finding involves, wrapped under the row like the fix.
    step = step_lineno()
    told = " ".join([lines, lines_continued]).split()
    assert told[:3] == ["lines:", "backward()", "at"]
    assert told[3].endswith(f"loops.py:{step - 3}")
    assert " ".join(told[4:]) == (
        f"wrote them, optimizer.zero_grad() at line {step - 1} cleared them, step() at line "
        f"{step} applied nothing"
    )
    assert row.split()[:4] == ["GG102", "cleared-before-step", "4", "1"]
    assert row.split()[4].endswith(f"loops.py:{step_lineno()}")
    assert row.split()[5:] == ["0.weight,", "0.bias,", "2.weight,", "+1", "more"]
    assert fix.split()[:3] == ["fix:", "move", "zero_grad()"]
    assert all(line.startswith(" " * 12) for line in fix_continued)
    assert out.rstrip().endswith("See docs/findings/GG102.md.")
    assert not ANSI.search(out)  # captured, like a pipe: no colour


def test_report_merges_one_file_per_rank_from_a_quoted_glob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files from several ranks are merged: counts add up, the first occurrence wins."""
    _log(tmp_path / "run-0.jsonl", steps=3, monkeypatch=monkeypatch, rank=0)
    _log(tmp_path / "run-1.jsonl", steps=6, monkeypatch=monkeypatch, rank=1)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run-*.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gradguard: 9 findings in 2 files\n")
    (row,) = [line for line in table(out) if line.startswith("GG")]
    assert row.split()[:4] == ["GG102", "cleared-before-step", "9", "1"]
    assert "note:" not in out


def test_a_log_without_its_summary_counts_distinct_findings_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that did not finish left no summary record: each finding counts once, with a note."""
    path = tmp_path / "run.jsonl"
    _log(path, steps=5, monkeypatch=monkeypatch)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1]["event"] == "summary"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:-1]) + '{"code": "GG1')
    capsys.readouterr()
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gradguard: 1 finding in {path}\n")
    assert f"note: {path} has no summary record" in out
    assert "skipped 1 line that is not a gradguard record" in out


def test_an_empty_log_reports_no_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log of a clean run is empty, and its report says there is nothing to fix."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path)
    train(bug=False)
    gradguard.uninstall()
    assert main(["report", str(path)]) == 0
    assert capsys.readouterr().out == f"gradguard: no findings in {path}\n"


@pytest.mark.parametrize("name", ["missing.jsonl", "run-*.jsonl"])
def test_report_of_nothing_exits_2_naming_the_path(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that does not exist, or a glob that matches nothing, is an error naming it."""
    assert main(["report", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert name in err
    assert err.startswith("gradguard report: no ")


def test_colour_only_on_a_terminal_and_never_with_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real terminal gets colour unless NO_COLOR is set; the text under it is the plain table."""
    row = SummaryRow("GG102", "cleared-before-step", "error", 4, 2, "t.py:3", ("w", "b"), "fix it")
    monkeypatch.delenv("NO_COLOR", raising=False)
    primary, secondary = os.openpty()
    with open(secondary, "w") as terminal, open(os.devnull, "w") as pipe:
        assert wants_colour(terminal)
        assert not wants_colour(pipe)
        monkeypatch.setenv("NO_COLOR", "1")
        assert not wants_colour(terminal)
    os.close(primary)
    coloured = render_table([row], colour=True)
    assert "\x1b[31;1mGG102\x1b[0m" in coloured  # errors in red
    assert ANSI.sub("", coloured) == render_table([row])


def test_the_fix_wraps_under_its_row_to_the_width(tmp_path: Path) -> None:
    """Long fixes wrap under their row, indented past the code column, within the width."""
    hint = "call optimizer.zero_grad() once per step " * 4
    row = SummaryRow("GG101", "stale-gradient", "error", 1, 1, "a/b.py:1", (), hint.strip())
    lines = render_table([row], width=72).splitlines()
    assert len(lines) > 3
    assert all(len(line) <= 72 for line in lines)
    assert all(line.startswith(" " * 7) for line in lines[2:])
    assert lines[1].split()[-1] == "-"  # no parameters
