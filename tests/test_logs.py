"""Logs: the JSON-lines file, the user's own structlog pipeline, and Python warnings."""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import torch.distributed as dist
from loops import step_lineno, train

import gradguard

FIELDS = {
    "code",
    "event",
    "level",
    "step",
    "optimizer",
    "params",
    "location",
    "hint",
    "doc",
    "message",
    "timestamp",
    "pid",
}
# A lifecycle finding's story: where backward wrote the gradients and zero_grad() cleared them.
STORY = {"written_at", "cleared_at"}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    gradguard.uninstall()
    structlog.reset_defaults()


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_log_is_created_at_install_even_without_findings(tmp_path: Path) -> None:
    """install(log_json=...) creates the file at once, so an empty file means a clean run."""
    path = tmp_path / "gg.jsonl"
    gradguard.install(mode="log", log_json=path)
    assert path.exists()
    train(bug=False)
    gradguard.uninstall()
    assert path.read_text() == ""


def test_json_log_holds_one_line_per_finding_with_every_field(tmp_path: Path) -> None:
    """Each distinct finding is one JSON object on one line, then a summary counts repeats."""
    path = tmp_path / "gg.jsonl"
    gradguard.install(mode="log", log_json=str(path))
    train(bug=True, steps=4)
    gradguard.uninstall()
    record, summary = _records(path)
    assert set(record) == FIELDS | STORY
    assert record["code"] == "GG102"
    assert record["event"] == "cleared-before-step"
    assert record["level"] == "error"
    assert record["step"] == 1
    assert str(record["optimizer"]).startswith("SGD#")
    assert record["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert str(record["location"]).endswith(f"loops.py:{step_lineno()}")
    # The story: the backward two lines up wrote them, the zero_grad() just above cleared them.
    assert str(record["written_at"]).endswith(f"loops.py:{step_lineno() - 3}")
    assert str(record["cleared_at"]).endswith(f"loops.py:{step_lineno() - 1}")
    assert str(record["message"]).startswith("GG102 cleared-before-step:")
    assert str(record["message"]).endswith(f"Fix: {record['hint']}. See {record['doc']}.")
    assert record["doc"] == "docs/findings/GG102.md"
    assert str(record["timestamp"]).endswith("Z")
    assert set(summary) == {"event", "counts", "timestamp", "pid"}
    assert (summary["event"], summary["counts"]) == ("summary", {"GG102": 4})


def test_json_log_in_a_missing_directory_is_rejected_at_the_call(tmp_path: Path) -> None:
    """A log path whose directory does not exist raises ValueError naming the path."""
    path = tmp_path / "missing" / "gg.jsonl"
    with pytest.raises(ValueError, match="missing"):
        gradguard.install(log_json=path)


def test_rank_placeholder_and_fields_under_a_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With torch.distributed initialised, {rank} names the file and records carry the rank."""
    # init_process_group installs a rank-prefixing sys.excepthook and never restores it.
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        gradguard.install(mode="log", log_json=tmp_path / "gg-{rank}.jsonl")
        train(bug=True)
        gradguard.uninstall()
    finally:
        dist.destroy_process_group()
    record, summary = _records(tmp_path / "gg-0.jsonl")
    assert set(record) == FIELDS | STORY | {"rank", "world_size"}
    assert (record["rank"], record["world_size"]) == (0, 1)
    assert (summary["event"], summary["rank"], summary["world_size"]) == ("summary", 0, 1)


def test_rank_placeholder_uses_the_launchers_rank_before_the_group_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before init_process_group, {rank} comes from the RANK variable torchrun sets."""
    monkeypatch.setenv("RANK", "3")
    gradguard.install(mode="log", log_json=tmp_path / "gg-{rank}.jsonl")
    assert (tmp_path / "gg-3.jsonl").exists()


def test_structlog_json_pipeline_receives_events_with_their_fields() -> None:
    """A user who configured structlog with a JSON renderer gets gradguard's events there."""
    out = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=out),
    )
    gradguard.install(mode="log")
    train(bug=True)
    gradguard.uninstall()
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["event"] == "cleared-before-step"
    assert event["level"] == "error"
    assert event["code"] == "GG102"
    assert event["step"] == 1
    assert event["params"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert event["location"].endswith(f"loops.py:{step_lineno()}")
    assert event["report"].startswith("GG102")
    assert event["hint"]


def test_stdlib_logging_bridge_receives_events_under_the_gradguard_logger() -> None:
    """Through structlog's stdlib bridge the events reach the 'gradguard' logging logger."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processor=structlog.processors.JSONRenderer())
    )
    logger = logging.getLogger("gradguard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        gradguard.install(mode="log")
        train(bug=True)
        gradguard.uninstall()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (event["logger"], event["event"], event["code"]) == (
        "gradguard",
        "cleared-before-step",
        "GG102",
    )


def test_stdlib_render_to_log_kwargs_bridge_keeps_the_guard_running() -> None:
    """With render_to_log_kwargs, events become LogRecord extras without clashing keys."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("gradguard")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    structlog.configure(
        processors=[structlog.stdlib.add_log_level, structlog.stdlib.render_to_log_kwargs],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    try:
        gradguard.install(mode="log")
        train(bug=True)
        gradguard.uninstall()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    codes = [getattr(r, "code", None) for r in records]
    assert codes == ["GG102"]
    assert "internal-error" not in [r.getMessage() for r in records]
    assert records[0].getMessage() == "cleared-before-step"


def test_without_structlog_config_events_are_console_lines_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unconfigured, gradguard prints readable lines to stderr and never configures structlog."""
    gradguard.install(mode="log")
    train(bug=True)
    gradguard.uninstall()
    out, err = capsys.readouterr()
    assert out == ""
    assert "cleared-before-step" in err
    assert "code=GG102" in err
    assert not structlog.is_configured()


def test_warnings_point_at_the_users_line_and_filter_by_class_or_code() -> None:
    """The warning names the user's step line; its class or a regex on its code silences it."""
    gradguard.install(mode="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(bug=True)
    (warning,) = caught
    assert warning.category is gradguard.ClearedBeforeStepWarning
    assert (Path(warning.filename).name, warning.lineno) == ("loops.py", step_lineno())
    assert gradguard.ClearedBeforeStepWarning.__module__ == "gradguard"
    for kwargs in ({"category": gradguard.ClearedBeforeStepWarning}, {"message": "GG102"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", **kwargs)
            train(bug=True)
        assert caught == []
