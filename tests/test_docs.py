"""The per-code pages under docs/findings: one per code, and their snippets do what they say."""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_plot import png_size

import gradguard
from gradguard._dispatch import add_sink
from gradguard._findings import CATALOGUE, Finding, make_finding
from gradguard.cli import main

PAGES = ROOT / "docs" / "findings"
SECTIONS = (
    "## What happened",
    "## Buggy loop",
    "## Corrected loop",
    "## Why it silently hurts training",
    "## Silencing it when intended",
)
# A snippet is the python block right after its marker comment.
SNIPPET = re.compile(r"^<!-- (buggy|fixed) -->\n```python\n(.*?)^```$", re.M | re.S)


def page(code: str) -> str:
    """The text of ``code``'s page."""
    return (PAGES / f"{code}.md").read_text(encoding="utf-8")


def snippet(code: str, kind: str) -> str:
    """The page's ``buggy`` or ``fixed`` snippet; exactly one of each is required."""
    found = [m.group(2) for m in SNIPPET.finditer(page(code)) if m.group(1) == kind]
    assert len(found) == 1, f"{code}.md needs exactly one <!-- {kind} --> python block"
    return found[0]


def run_snippet(source: str) -> list[Finding]:
    """Run ``source`` as the page says a reader would (saved as train.py); return its findings."""
    found: list[Finding] = []
    handle = add_sink(lambda finding, first: found.append(finding) if first else None)
    namespace: dict[str, object] = {"__name__": "__main__"}
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            exec(compile(source, "train.py", "exec"), namespace)
            for value in namespace.values():
                if isinstance(value, torch.optim.Optimizer):
                    gradguard.unguard(value)  # reports anything still pending
    finally:
        handle.remove()
        namespace.clear()
        gc.collect()
    return found


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_every_code_has_a_page_with_every_section(code: str) -> None:
    """Each catalogued code has docs/findings/CODE.md, titled with its name, with all sections."""
    entry = CATALOGUE[code]
    assert (ROOT / entry.doc).is_file(), f"write {entry.doc}: every code needs a page"
    text = page(code)
    assert text.splitlines()[0] == f"# {code} {entry.name}"
    positions = [text.find(section + "\n") for section in SECTIONS]
    assert -1 not in positions, f"{code}.md lacks a section of {SECTIONS}"
    assert positions == sorted(positions)
    assert f'ignore=["{code}"]' in text
    assert f"[{code}]({code}.md)" in (PAGES / "README.md").read_text(encoding="utf-8")


def test_every_page_is_a_catalogued_code() -> None:
    """No page describes a code the catalogue does not have."""
    assert sorted(p.stem for p in PAGES.glob("GG*.md")) == sorted(CATALOGUE)


# Pages whose loops start several processes: run as the reader would, as a script.
MULTI_PROCESS = {"GG401"}
IN_PROCESS = sorted(set(CATALOGUE) - MULTI_PROCESS)


def run_script(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``source`` saved as train.py with this checkout importable."""
    script = tmp_path / "train.py"
    script.write_text(source, encoding="utf-8")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize("code", sorted(MULTI_PROCESS))
def test_multi_process_pages_report_their_code_and_the_fix_silences_it(
    code: str, tmp_path: Path
) -> None:
    """A page whose loop spawns ranks: the buggy script reports the code, the fixed one nothing."""
    buggy = run_script(snippet(code, "buggy"), tmp_path)
    assert buggy.returncode == 0, buggy.stderr
    assert f"{code} " in buggy.stderr
    fixed = run_script(snippet(code, "fixed"), tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert not re.search(r"GG\d{3} ", fixed.stderr), fixed.stderr


@pytest.mark.parametrize("code", IN_PROCESS)
def test_buggy_snippet_reports_the_pages_code_as_shown(code: str) -> None:
    """The page's buggy loop reports its code, with exactly the message the page shows."""
    findings = run_snippet(snippet(code, "buggy"))
    mine = [f for f in findings if f.code == code]
    assert mine, f"{code}.md's buggy loop reported {[f.code for f in findings]}, not {code}"
    # Labels count optimizers per process; the page shows a fresh process's, which
    # numbers a page's optimizers of a kind from 0.
    labels = re.findall(r"\b([A-Z]\w*)#(\d+)\b", mine[0].message)
    first = {kind: min(int(n) for k, n in labels if k == kind) for kind, _ in labels}
    message = re.sub(
        r"\b([A-Z]\w*)#(\d+)\b", lambda m: f"{m[1]}#{int(m[2]) - first[m[1]]}", mine[0].message
    )
    assert message in page(code), "paste the message the buggy loop now reports"


@pytest.mark.parametrize("code", IN_PROCESS)
def test_fixed_snippet_reports_nothing(code: str) -> None:
    """The page's corrected loop reports no finding at all."""
    assert [f.message for f in run_snippet(snippet(code, "fixed"))] == []


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_message_ends_with_the_pages_path(code: str) -> None:
    """Every finding's message ends, after the fix, by naming the page that explains it."""
    finding = make_finding(code, step=3, optimizer="SGD#0", params=("w",), location="t.py:1")
    assert finding.doc == f"docs/findings/{code}.md" == CATALOGUE[code].doc
    assert finding.message.endswith(f"Fix: {finding.hint}. See docs/findings/{code}.md.")


def test_pages_are_linked_from_the_readme() -> None:
    """The README's table of findings links each code to its page."""
    readme = Path(ROOT / "README.md").read_text(encoding="utf-8")
    for code in CATALOGUE:
        assert f"[{code}](docs/findings/{code}.md)" in readme


def test_readme_shows_the_tutorial_timeline(tmp_path: Path, subprocess_env: dict[str, str]):
    """The flagship demo's timeline commands, run again: every step applied nothing of what
    backward produced, and the picture is the README's."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("$ python -m gradguard run --record-norms") :]
    commands = [line[2:] for line in block[: block.index("```")].splitlines()]
    for command in commands:  # writing to tmp_path instead of docs/
        args = [a.replace("docs/", f"{tmp_path}/") for a in command.split()[1:]]
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
    norms = [
        r
        for r in map(json.loads, (tmp_path / "tutorial.jsonl").read_text().splitlines())
        if r.get("event") == "norms"
    ]
    assert {r["total"] for r in norms} == {0.0}
    assert all(r["produced"] > 0 for r in norms[1:])
    assert png_size((tmp_path / "tutorial_timeline.png").read_bytes()) == png_size(
        (ROOT / "docs" / "tutorial_timeline.png").read_bytes()
    )
    assert "![the tutorial's gradient timeline](docs/tutorial_timeline.png)" in readme


def test_readme_shows_the_report_of_its_own_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], subprocess_env: dict[str, str]
) -> None:
    """The README's timeline commands, run again, print its summary table and draw its picture."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("$ python -m gradguard run --mode log --record-norms") :]
    commands = [line[2:] for line in block[: block.index("```")].splitlines()]
    assert [c.split()[:4] for c in commands] == [
        ["python", "-m", "gradguard", "run"],
        ["python", "-m", "gradguard", "report"],
    ]
    for command in commands:  # the same commands, writing to tmp_path instead of docs/
        args = [a.replace("docs/", f"{tmp_path}/") for a in command.split()[1:]]
        proc = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
    assert png_size((tmp_path / "timeline.png").read_bytes()) == png_size(
        (ROOT / "docs" / "timeline.png").read_bytes()
    )
    assert "![gradient timeline](docs/timeline.png)" in readme
    assert (ROOT / "docs" / "timeline.png").stat().st_size < 200_000
    assert main(["report", str(tmp_path / "run.jsonl")]) == 0
    out = capsys.readouterr().out.replace(f"{tmp_path}/", "docs/")
    assert "$ python -m gradguard report docs/run.jsonl\n" + out in readme, (
        "run the commands in the README's Reports section and paste the table"
    )
