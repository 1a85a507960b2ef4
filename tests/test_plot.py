"""``gradguard report --plot``: the gradient timeline of a recorded run, as a PNG."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Net, batches, loss_of

import gradguard
from gradguard import _plot
from gradguard._report import expand, load
from gradguard.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    gradguard.uninstall()


def record_run(path: Path, *, optimizers: int = 1, spike_at: int = 24) -> None:
    """Train `Net` for 30 steps with norms recorded; one batch's loss jumps (GG202)."""
    gradguard.install(mode="log", log_json=path, record_norms=True)
    torch.manual_seed(0)
    net = Net()
    if optimizers == 1:
        opts = [torch.optim.SGD(net.parameters(), lr=0.05)]
    else:  # two optimizers, as a GAN has: one panel each
        opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (net.encoder, net.head)]
    for opt in opts:
        gradguard.guard(opt, model=net)
    for i, batch in enumerate(batches(30)):
        for opt in opts:
            opt.zero_grad()
        loss = loss_of(net, batch) * (1e4 if i == spike_at else 1.0)
        loss.backward()
        for opt in opts:
            opt.step()
    gradguard.uninstall()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's header chunk, which must come first."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(("optimizers", "height"), [(1, 360), (2, 720)])
def test_plot_writes_a_valid_png_of_sensible_size(
    optimizers: int, height: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The timeline is a PNG, 900 pixels wide and 360 high per optimizer, of a sane file size."""
    log, png = tmp_path / "run.jsonl", tmp_path / "timeline.png"
    record_run(log, optimizers=optimizers)
    capsys.readouterr()
    assert main(["report", str(log), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"timeline written to {png}")
    assert "draw them with --plot" not in out
    data = png.read_bytes()
    assert png_size(data) == (900, height)
    assert 10_000 < len(data) < 400_000
    assert data.endswith(b"IEND\xaeB`\x82")  # complete, not truncated


def test_each_finding_is_a_labelled_marker_at_its_step(tmp_path: Path) -> None:
    """The panel draws total and module lines and labels the finding's marker with its code."""
    log = tmp_path / "run.jsonl"
    record_run(log, spike_at=24)
    run = load(expand([str(log)]))
    (finding,) = run.findings
    assert (finding["code"], finding["step"]) == ("GG202", 25)
    plt = _plot.load_pyplot()
    assert plt is not None
    fig, ax = plt.subplots()
    try:
        (name,) = _plot._series(run)
        _plot._panel(ax, name, _plot._series(run)[name], run.findings)
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels[:3] == ["total", "encoder", "head"]
        (text,) = ax.texts
        assert text.get_text() == "GG202"
        step, norm = text.xy
        assert step == 25
        assert norm == pytest.approx(_plot._series(run)[name].total_at(25))
        assert ax.get_yscale() == "log"
    finally:
        plt.close(fig)


def test_plot_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib, --plot exits 2 and names the extra to install."""
    log = tmp_path / "run.jsonl"
    record_run(log)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package imports as
    assert main(["report", str(log), "--plot", str(tmp_path / "t.png")]) == 2
    assert 'install it with: pip install "gradguard[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_plot_of_a_log_without_norms_says_how_to_record_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log recorded without record_norms has nothing to draw: exit 1 and say how to record."""
    log = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=log)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for batch in batches(3):
        loss_of(net, batch).backward()
        opt.zero_grad()
        opt.step()
    gradguard.uninstall()
    assert main(["report", str(log), "--plot", str(tmp_path / "t.png")]) == 1
    assert "--record-norms" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()


def test_a_loop_that_clears_before_its_step_draws_what_backward_produced(tmp_path: Path):
    """The tutorial's bug has a picture: backward's norm at every step, none applied."""
    log, png = tmp_path / "run.jsonl", tmp_path / "timeline.png"
    gradguard.install(mode="log", log_json=log, record_norms=True)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.05), model=net)
    for batch in batches(5):
        loss_of(net, batch).backward()
        opt.zero_grad()
        opt.step()
    gradguard.uninstall()
    (series,) = _plot._series(load(expand([str(log)]))).values()
    assert series.nothing == [1, 2, 3, 4, 5]
    assert series.differs
    assert series.total_at(3) == series.produced[2] > 0  # GG102's mark sits on backward's
    assert main(["report", str(log), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_a_correct_loop_draws_one_line():
    """Where every step applies what backward produced, there is nothing else to draw."""
    series = _plot._Series()
    for step in (1, 2):
        series.add({"step": step, "total": 2.0 * step, "produced": 2.0 * step, "modules": {}})
    assert not series.differs
    assert series.nothing == []
