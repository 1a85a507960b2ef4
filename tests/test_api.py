"""The public surface: argument checking, modes, summaries and the catalogue."""

from __future__ import annotations

import pytest
import structlog
import torch
from conftest import Net, batches, loss_of

import gradguard


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (None, TypeError, "needs a torch.optim.Optimizer; got NoneType"),
        ("sgd", TypeError, "needs a torch.optim.Optimizer; got str"),
    ],
)
def test_guard_rejects_what_is_not_an_optimizer(bad, error, words):
    """Anything but an optimizer is a TypeError naming what was passed."""
    with pytest.raises(error, match=words):
        gradguard.guard(bad)


def test_guard_rejects_a_model_and_says_how_to_call_it(net):
    """Passing the model instead of its optimizer gets a TypeError with the right call."""
    with pytest.raises(TypeError, match=r"takes the optimizer, not the model \(Net\)"):
        gradguard.guard(net)


def test_guard_rejects_an_unknown_mode(net):
    """A misspelt mode is a ValueError listing the modes."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"mode must be one of warn, strict, log; got 'strcit'"):
        gradguard.guard(opt, mode="strcit")
    assert gradguard.guard_of(opt) is None


def test_guard_rejects_unknown_codes(net):
    """An unknown code in ``ignore`` is a ValueError listing the known ones."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"unknown finding code 'GG999'; known codes: GG101"):
        gradguard.guard(opt, ignore=["GG999"])


def test_guard_rejects_a_model_argument_that_is_not_a_module(net):
    """``model=`` must be a module or modules."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        gradguard.guard(opt, model=[net, "head"])


def test_summary_counts_per_code_with_the_first_location(net):
    """``summary()`` gives one row per code: count, first step, location and fix."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, model=net, mode="log") as g:
        for b in batches(4):
            loss_of(net, b).backward()
            opt.zero_grad()
            opt.step()
    (row,) = g.summary()
    assert (row.code, row.name, row.count, row.first_step) == ("GG102", "cleared-before-step", 4, 1)
    assert row.location.startswith("tests/test_api.py:") or "test_api.py:" in row.location
    assert row.hint.startswith("move zero_grad()")


def test_catalogue_entries_are_complete():
    """Every catalogued code has a name, a level, a warning and an error class."""
    for code, entry in gradguard.CATALOGUE.items():
        assert entry.code == code
        assert code.startswith("GG")
        assert entry.name
        assert entry.hint
        assert entry.level in {"info", "warning", "error"}
        f = gradguard.Finding(code, entry.name, entry.level, "m", entry.hint, 1, "SGD#0", (), "")
        assert f.code == code


def test_log_mode_emits_a_structlog_event_with_stable_keys(net):
    """Log mode sends one keyed structlog event per new finding."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with structlog.testing.capture_logs() as logs, gradguard.guarding(opt, mode="log"):
        for b in batches(3):
            loss_of(net, b).backward()
            opt.zero_grad()
            opt.step()
    (event,) = [e for e in logs if e.get("code")]
    assert event["event"] == "cleared-before-step"
    assert event["log_level"] == "error"
    assert event["params"] == ["encoder.0.weight", "encoder.0.bias", "head.weight", "head.bias"]
    assert event["step"] == 1
    assert event["optimizer"].startswith("SGD#")
    assert "test_api.py:" in event["location"]


def test_log_mode_without_structlog_config_writes_to_stderr_only(net, capsys):
    """Unconfigured, the console line goes to stderr and stdout stays the user's."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, mode="log"):
        loss_of(net, batches(1)[0]).backward()
        opt.zero_grad()
        opt.step()
    out, err = capsys.readouterr()
    assert out == ""
    assert "cleared-before-step" in err
    assert "code=GG102" in err


def test_internal_failure_is_contained_in_log_mode(net, monkeypatch, capsys):
    """A bug inside gradguard is logged once, disables the guard, and training goes on."""
    import gradguard._guard as guard_module

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(guard_module, "judge_step", broken)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, mode="log") as g:
        for b in batches(3):
            opt.zero_grad()
            loss_of(net, b).backward()
            opt.step()
        assert g.closed
    err = capsys.readouterr().err
    assert err.count("internal-error") == 1
    assert "boom" in err


def test_internal_failure_surfaces_in_strict_mode(net, monkeypatch, capsys):
    """In strict mode a failure inside gradguard raises GradGuardInternalError."""
    import gradguard._guard as guard_module

    monkeypatch.setattr(guard_module, "judge_step", lambda *args: 1 / 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradguard.guarding(opt, mode="strict"):
        opt.zero_grad()
        loss_of(net, batches(1)[0]).backward()
        with pytest.raises(gradguard.GradGuardInternalError, match="ZeroDivisionError"):
            opt.step()
    capsys.readouterr()


def test_threads_training_separate_models_do_not_cross_talk():
    """Two threads, each with its own model and guard, report only their own bugs."""
    import threading

    results: dict[str, list[str]] = {}

    def work(name: str, buggy: bool) -> None:
        torch.manual_seed(0)
        net = Net()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with gradguard.guarding(opt, model=net, mode="log") as g:
            for b in batches(20):
                if not buggy:
                    opt.zero_grad()
                loss_of(net, b).backward()
                opt.step()
        results[name] = [f.code for f in g.findings]

    threads = [threading.Thread(target=work, args=(n, n == "buggy")) for n in ("buggy", "ok")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"buggy": ["GG101"], "ok": []}


def test_every_option_has_one_check():
    """Each guard option is validated by exactly one check, whatever entry point passes it."""
    from gradguard._config import _CHECKS, OPTION_NAMES

    assert tuple(_CHECKS) == OPTION_NAMES


def test_an_unknown_option_names_itself_and_the_known_ones():
    """An option gradguard does not have raises a TypeError naming it and listing the options."""
    from gradguard._config import make_options

    with pytest.raises(TypeError, match=r"unknown guard option 'explode'; the options are mode, "):
        make_options(explode=3.0)
