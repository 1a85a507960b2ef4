"""record_norms: every step's gradient norms, total and per top-level module, in the JSON log."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import torch
from conftest import ROOT, Net, batches, loss_of
from torch import nn

import gradguard
from gradguard.cli import main


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    gradguard.uninstall()


def _no_nan(token: str) -> float:
    raise ValueError(f"{token} is not JSON")


def _records(path: Path, event: str | None = None) -> list[dict[str, object]]:
    """The log's records (of one ``event``), parsed as strict JSON: NaN or Infinity fail."""
    records = [json.loads(line, parse_constant=_no_nan) for line in path.read_text().splitlines()]
    return [r for r in records if event is None or r.get("event") == event]


def _norm(params: Iterator[nn.Parameter]) -> float:
    grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def test_recorded_norms_match_norms_computed_independently(tmp_path: Path) -> None:
    """Each step's total and per-module norms equal the norms of the gradients it applied."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path, record_norms=True)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(torch.optim.AdamW(net.parameters(), lr=1e-2), model=net)
    expected = []
    for i, batch in enumerate(batches(6)):
        opt.zero_grad()
        (loss_of(net, batch) * (1 + i)).backward()
        expected.append(
            {
                "total": _norm(net.parameters()),
                "encoder": _norm(net.encoder.parameters()),
                "head": _norm(net.head.parameters()),
            }
        )
        opt.step()
    gradguard.uninstall()
    norms = _records(path, "norms")
    assert [r["step"] for r in norms] == [1, 2, 3, 4, 5, 6]
    label = gradguard.guard_of(opt).optimizer
    assert {r["optimizer"] for r in norms} == {label}
    for record, want in zip(norms, expected, strict=True):
        keys = {"event", "step", "optimizer", "total", "produced", "modules", "pid"}
        assert set(record) == keys
        assert list(record["modules"]) == ["encoder", "head"]
        got = {"total": record["total"], **record["modules"]}
        assert got == pytest.approx(want, rel=1e-5)
        assert record["produced"] == record["total"]  # nothing came between


def _recorded_loop(path: Path, between: str) -> list[float]:
    """Six steps of `Net` with norms recorded and ``between`` backward and step ("clear",
    the tutorial's bug, or "clip"); returns the norm each backward produced."""
    gradguard.install(mode="log", log_json=path, record_norms=True)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=1e-2), model=net)
    produced = []
    for i, batch in enumerate(batches(6)):
        if between == "clip":
            opt.zero_grad()
        (loss_of(net, batch) * (1 + i)).backward()
        produced.append(_norm(net.parameters()))
        if between == "clear":
            opt.zero_grad()
        else:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        opt.step()
    gradguard.uninstall()
    return produced


def test_a_clear_between_backward_and_step_records_what_backward_produced(tmp_path: Path):
    """The tutorial's bug: each step applies nothing (total 0.0) of what backward produced.

    The first step, the first not as backward left it, has no norm of backward's yet.
    """
    path = tmp_path / "run.jsonl"
    produced = _recorded_loop(path, "clear")
    norms = _records(path, "norms")
    assert [r["step"] for r in norms] == [1, 2, 3, 4, 5, 6]
    assert [r["total"] for r in norms] == [0.0] * 6
    assert [r["modules"] for r in norms] == [{}] * 6
    assert norms[0]["produced"] is None
    got = [r["produced"] for r in norms[1:]]
    assert got == pytest.approx(produced[1:], rel=1e-5)
    assert [r["code"] for r in _records(path) if "code" in r] == ["GG102"]


def test_a_clip_records_the_norm_backward_produced_before_it(tmp_path: Path):
    """A clipped step applies the clipped norm and records backward's, taken before the clip."""
    path = tmp_path / "run.jsonl"
    produced = _recorded_loop(path, "clip")
    norms = _records(path, "norms")
    assert [r["total"] for r in norms] == pytest.approx([0.01] * 6, rel=1e-3)
    assert norms[0]["produced"] is None
    assert [r["produced"] for r in norms[1:]] == pytest.approx(produced[1:], rel=1e-5)


def test_more_modules_than_the_cap_keep_the_largest_and_fold_the_rest(tmp_path: Path) -> None:
    """Past 8 top-level modules, the 8 largest are kept and the rest add up in "(other)"."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path, record_norms=True)
    torch.manual_seed(0)
    model = nn.ModuleDict({f"layer{k}": nn.Linear(4, k + 1) for k in range(10)})
    opt = gradguard.guard(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        sum(m(x).pow(2).mean() for m in model.values()).backward()
        opt.step()
    gradguard.uninstall()
    for record in _records(path, "norms"):
        modules = record["modules"]
        assert isinstance(modules, dict)
        assert list(modules) == [f"layer{k}" for k in range(2, 10)] + ["(other)"]
        assert math.hypot(*modules.values()) == pytest.approx(record["total"], rel=1e-6)


def test_a_non_finite_norm_is_null_and_the_log_stays_json(tmp_path: Path) -> None:
    """A NaN gradient makes its module's and the total norm null, never a bare NaN token."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path, record_norms=True)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    for i, batch in enumerate(batches(3)):
        opt.zero_grad()
        loss = loss_of(net, batch)
        if i == 1:
            loss = loss + (net.head.bias * float("nan")).sum()
        loss.backward()
        opt.step()
    gradguard.uninstall()
    step2 = next(r for r in _records(path, "norms") if r["step"] == 2)
    assert step2["total"] is None
    modules = step2["modules"]
    assert isinstance(modules, dict)
    assert modules["head"] is None
    assert isinstance(modules["encoder"], float)
    assert [r["code"] for r in _records(path) if "code" in r] == ["GG201"]


def test_norms_are_recorded_with_the_numeric_checks_off(tmp_path: Path) -> None:
    """check_numerics=False turns off GG201 and GG202, not the norms asked for."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(
        torch.optim.SGD(net.parameters(), lr=0.1),
        model=net,
        check_numerics=False,
        record_norms=True,
    )
    for batch in batches(3):
        opt.zero_grad()
        (loss_of(net, batch) + (net.head.bias * float("nan")).sum()).backward()
        opt.step()
    gradguard.uninstall()
    records = _records(path)
    assert [(r["event"], r["step"], r["total"]) for r in records] == [
        ("norms", 1, None),
        ("norms", 2, None),
        ("norms", 3, None),
    ]


def test_norms_are_recorded_every_step_whatever_the_numerics_cadence(tmp_path: Path) -> None:
    """With numerics_every=5 the checks would skip steps; recording norms runs them all."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(
        torch.optim.SGD(net.parameters(), lr=0.1), model=net, numerics_every=5, record_norms=True
    )
    for batch in batches(7):
        opt.zero_grad()
        loss_of(net, batch).backward()
        opt.step()
    gradguard.uninstall()
    assert [r["step"] for r in _records(path, "norms")] == list(range(1, 8))


def test_without_record_norms_nothing_but_findings_is_written(tmp_path: Path) -> None:
    """record_norms is off by default: a clean run's log stays empty."""
    path = tmp_path / "run.jsonl"
    gradguard.install(mode="log", log_json=path)
    torch.manual_seed(0)
    net = Net()
    opt = gradguard.guard(torch.optim.SGD(net.parameters(), lr=0.1), model=net)
    for batch in batches(3):
        opt.zero_grad()
        loss_of(net, batch).backward()
        opt.step()
    gradguard.uninstall()
    assert path.read_text() == ""


def test_record_norms_without_a_log_says_where_norms_go() -> None:
    """guard(record_norms=True) with no JSON log open logs once how to open one."""
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with structlog.testing.capture_logs() as logs, gradguard.guarding(opt, record_norms=True):
        pass
    (event,) = [e for e in logs if e["event"] == "record-norms-without-log"]
    assert "gradguard.install(log_json=PATH)" in event["note"]


def test_record_norms_needs_a_json_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """install() and the runner refuse record_norms without a JSON log, naming what is missing."""
    with pytest.raises(ValueError, match="record_norms=True needs log_json"):
        gradguard.install(mode="log", record_norms=True)
    with pytest.raises(TypeError, match="record_norms must be True or False"):
        gradguard.install(mode="log", log_json=tmp_path / "x.jsonl", record_norms="yes")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["run", "--record-norms", "train.py"])
    assert info.value.code == 2
    assert "--record-norms needs --log-json" in capsys.readouterr().err


def test_runner_records_the_norms_of_a_script_that_guards_itself(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """gradguard run --record-norms reaches the script's guard(): one record per step, in order."""
    path = tmp_path / "run.jsonl"
    command = "run --mode log --record-norms --log-json {} examples/exploding_gradient.py"
    proc = subprocess.run(
        [sys.executable, "-m", "gradguard", *command.format(path).split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    norms = _records(path, "norms")
    assert [r["step"] for r in norms] == list(range(1, 41))
    assert all(list(r["modules"]) == ["0", "2"] for r in norms)
    records = _records(path)
    (at,) = [i for i, r in enumerate(records) if "code" in r]
    assert (records[at]["code"], records[at]["step"]) == ("GG202", 31)
    # Norms are written in batches, yet the file stays in the order things happened.
    assert [records[at - 1]["step"], records[at + 1]["step"]] == [31, 32]
    assert records[-1]["event"] == "summary"
