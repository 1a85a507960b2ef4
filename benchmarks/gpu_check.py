"""The GPU check: what only a CUDA device can show, in one command and one table.

On CUDA, gradguard's device results (the numeric checks' norms, the zero check
that tells a clip from a clear) are copied back without blocking and judged a
step or more later. This script runs, on one CUDA device, in a few minutes:

- ``cuda-tests``: every test marked ``cuda`` in the suite;
- ``findings``: a buggy loop for every single-process finding code (and its
  correct twin), in warn and log mode, under ``set_sync_debug_mode("error")``,
  compared with the same loops on the CPU: same codes, steps and parameters;
- ``strict``: each buggy loop in strict mode raises at the step the CPU names;
- ``amp``: float16 autocast with ``GradScaler``, its first steps skipped for
  infs: silent, and bit-identical to the unguarded run;
- ``fused``: fused and capturable optimizers: silent, bit-identical;
- ``overhead``: ``benchmarks/overhead.py --device cuda --quick``.

    python benchmarks/gpu_check.py                # on a CUDA machine: everything
    python benchmarks/gpu_check.py --dry-run      # what it would run; exits 0 anywhere
    python benchmarks/gpu_check.py --device cpu   # the loops on the CPU, results held
                                                  # back until close, against eager ones

It exits 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Deterministic cuBLAS, so that guarded and unguarded runs can be compared bit for bit.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import structlog
import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard._health import LATENESS
from gradguard.testing import record

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ("cuda-tests", "findings", "strict", "amp", "fused", "overhead")
Seen = list[tuple[str, int, tuple[str, ...]]]


# -- the loops ---------------------------------------------------------------


class Net(nn.Module):
    """An encoder, a head, and a branch only some loops use."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)
        self.aux = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, aux: bool = True) -> torch.Tensor:
        h = self.encoder(x)
        return self.head(h) + self.aux(h) if aux else self.head(h)


@dataclasses.dataclass
class Loop:
    """One training step of a buggy loop (``bug=True``) or of its correct twin."""

    code: str
    step: Callable[[Net, torch.optim.Optimizer, torch.Tensor, int, bool], None]
    guard: dict[str, Any] = dataclasses.field(default_factory=dict)
    trains: Callable[[Net], list[nn.Parameter]] = lambda net: list(net.parameters())


def _loss(net: Net, x: torch.Tensor, aux: bool = True) -> torch.Tensor:
    return F.mse_loss(net(x, aux), x[:, :2])


def _stale(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    if not bug:
        opt.zero_grad()
    _loss(net, x).backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # the zero check tells it from a clear
    opt.step()


def _cleared(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    _loss(net, x).backward()
    if bug:
        net.zero_grad(set_to_none=False)  # seen only by the zero check on the device
    opt.step()


def _no_backward(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    loss = _loss(net, x)
    if not bug or i < 2:
        loss.backward()
    opt.step()


def _accumulated(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    for _ in range(3 if bug else 2):  # two micro-batches declared
        _loss(net, x).backward()
    opt.step()


def _discarded(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    for _ in range(2):
        if bug:
            opt.zero_grad()
        _loss(net, x).backward()
    opt.step()


def _non_finite(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    if bug and i == 3:
        x = x * float("nan")
    _loss(net, x).backward()
    opt.step()


def _exploding(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    (_loss(net, x) * (1e6 if bug and i == 5 else 1.0)).backward()
    opt.step()


def _unused(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    _loss(net, x, aux=not bug).backward()
    opt.step()


def _unoptimized(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    opt.zero_grad()
    _loss(net, x, aux=bug).backward()
    opt.step()


def _eval_mode(net: Net, opt: torch.optim.Optimizer, x: torch.Tensor, i: int, bug: bool) -> None:
    net.train(not (bug and i >= 2))
    opt.zero_grad()
    _loss(net, x).backward()
    opt.step()


def _without_aux(net: Net) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if not n.startswith("aux.")]


LOOPS = {
    "stale-gradient": Loop("GG101", _stale),
    "cleared-before-step": Loop("GG102", _cleared),
    "step-without-backward": Loop("GG103", _no_backward),
    "accumulation-mismatch": Loop("GG104", _accumulated, {"accumulation_steps": 2}),
    "discarded-gradients": Loop("GG105", _discarded),
    "non-finite-gradient": Loop("GG201", _non_finite),
    "exploding-gradient": Loop("GG202", _exploding),
    "unused-parameter": Loop("GG301", _unused, {"unused_after": 4}),
    "unoptimized-parameter": Loop("GG302", _unoptimized, trains=_without_aux),
    "eval-mode-step": Loop("GG303", _eval_mode),
}
STEPS = 8


def run_loop(loop: Loop, device: torch.device, mode: str, *, bug: bool, no_sync: bool) -> Seen:
    """Every finding of ``STEPS`` steps of ``loop``, in order; with ``no_sync``, the steps
    after the first run under ``set_sync_debug_mode("error")`` (CUDA)."""
    torch.manual_seed(0)
    net = Net().to(device)
    opt = torch.optim.SGD(loop.trains(net), lr=0.01)
    xs = [torch.randn(8, 4, device=device) for _ in range(STEPS)]
    g = gradguard.guard_of(gradguard.guard(opt, model=net, mode=mode, **loop.guard))
    assert g is not None
    try:
        with warnings.catch_warnings(), record(g) as seen:
            warnings.simplefilter("ignore")
            for i, x in enumerate(xs):
                with _sync_errors(device, no_sync and i > 0):
                    loop.step(net, opt, x, i, bug)
    finally:
        gradguard.unguard(opt)  # strict mode raised: the guard goes all the same
    return [(f.code, f.step, f.params) for f in seen]


@contextlib.contextmanager
def _sync_errors(device: torch.device, on: bool) -> Iterator[None]:
    if not (on and device.type == "cuda"):
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def held_back(device: torch.device) -> Iterator[None]:
    """On the CPU, every device result arrives only at close, as the slowest GPU would."""
    if device.type == "cpu":
        LATENESS.until_close = True
    try:
        yield
    finally:
        LATENESS.reset()


# -- the checks --------------------------------------------------------------


@dataclasses.dataclass
class Result:
    check: str
    ok: bool
    detail: str
    seconds: float = 0.0


def check_findings(device: torch.device) -> Result:
    """Each code's buggy loop in warn and log mode, under set_sync_debug_mode("error"):
    the same findings (code, step, parameters) as on the CPU; its correct twin silent."""
    wrong = []
    for name, loop in LOOPS.items():
        expected = run_loop(loop, torch.device("cpu"), "log", bug=True, no_sync=False)
        if not expected or expected[0][0] != loop.code:
            wrong.append(f"{name}: the CPU reference shows {expected[:1]}")
            continue
        for mode in ("warn", "log"):
            with held_back(device):
                got = run_loop(loop, device, mode, bug=True, no_sync=True)
                twin = run_loop(loop, device, mode, bug=False, no_sync=True)
            if got != expected:
                wrong.append(f"{name}/{mode}: {got[:2]} != {expected[:2]}")
            if twin:
                wrong.append(f"{name}/{mode}: the correct twin shows {twin[:1]}")
    detail = "; ".join(wrong) or f"{len(LOOPS)} codes x warn, log: as on the CPU, no sync"
    return Result("findings", not wrong, detail)


def check_strict(device: torch.device) -> Result:
    """Each code's buggy loop in strict mode raises at the step the CPU reports first."""
    wrong = []
    for name, loop in LOOPS.items():
        expected = run_loop(loop, torch.device("cpu"), "log", bug=True, no_sync=False)
        try:
            with held_back(device):
                run_loop(loop, device, "strict", bug=True, no_sync=False)
        except gradguard.GradGuardError as exc:
            got = (exc.finding.code, exc.finding.step) if exc.finding else None
            if got != expected[0][:2]:
                wrong.append(f"{name}: raised {got}, expected {expected[0][:2]}")
        else:
            wrong.append(f"{name}: strict mode never raised")
    return Result("strict", not wrong, "; ".join(wrong) or f"{len(LOOPS)} codes: at the step")


def _train(
    device: torch.device, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer], guarded: bool
) -> tuple[list[torch.Tensor], list[str], int]:
    """Parameters after 12 AMP steps (float16 autocast and GradScaler on CUDA, its first
    steps skipped for infs by a huge initial scale), the findings, and the skipped steps."""
    torch.manual_seed(0)
    net = Net().to(device)
    opt = make(list(net.parameters()))
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**40, enabled=amp)
    g = gradguard.guard_of(gradguard.guard(opt, model=net, mode="strict")) if guarded else None
    skipped = 0
    for _ in range(12):
        x = torch.randn(64, 4, device=device)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = _loss(net, x)
        scale = scaler.get_scale() if amp else 1.0
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skipped += int(amp and scaler.get_scale() < scale)
    findings = [f.code for f in g.findings] if g is not None else []
    if guarded:
        gradguard.unguard(opt)
    return [p.detach().cpu() for p in net.parameters()], findings, skipped


def _same_training(
    name: str, device: torch.device, make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
) -> str | None:
    plain, _, skipped = _train(device, make, guarded=False)
    guarded, findings, _ = _train(device, make, guarded=True)
    if findings:
        return f"{name}: {findings}"
    if not all(torch.equal(a, b) for a, b in zip(plain, guarded, strict=True)):
        return f"{name}: parameters differ from the unguarded run"
    if device.type == "cuda" and not skipped:
        return f"{name}: no step was skipped; the check proves nothing"
    return None


def check_amp(device: torch.device) -> Result:
    """float16 autocast with GradScaler, skipped steps included: silent, bit-identical."""
    wrong = [
        w
        for w in (
            _same_training("SGD", device, lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
            _same_training("AdamW", device, lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
        )
        if w
    ]
    detail = "float16 autocast, GradScaler, skipped steps: silent, bit-identical"
    return Result("amp", not wrong, "; ".join(wrong) or detail)


def check_fused(device: torch.device) -> Result:
    """Fused and capturable Adam, AdamW and SGD in strict mode: silent, bit-identical."""
    if device.type != "cuda":
        return Result("fused", True, "skipped: fused and capturable need CUDA")
    makes: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "Adam fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "SGD fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        "Adam capturable": lambda ps: torch.optim.Adam(ps, lr=1e-3, capturable=True),
        "AdamW capturable": lambda ps: torch.optim.AdamW(ps, lr=1e-3, capturable=True),
    }
    wrong = [w for name, make in makes.items() if (w := _same_training(name, device, make))]
    return Result("fused", not wrong, "; ".join(wrong) or f"{len(makes)} optimizers: silent")


def _subprocess(args: list[str], timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def check_cuda_tests(device: torch.device) -> Result:
    """pytest -m cuda tests: every test that needs a CUDA device."""
    if device.type != "cuda":
        return Result("cuda-tests", True, "skipped: needs CUDA")
    proc = _subprocess(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"], 240)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return Result("cuda-tests", proc.returncode == 0, last)


def check_overhead(device: torch.device) -> Result:
    """benchmarks/overhead.py --device cuda --quick: the table, and no sync in warn/log."""
    if device.type != "cuda":
        return Result("overhead", True, "skipped: the CPU table is benchmarks/overhead.py's")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        proc = _subprocess(
            ["benchmarks/overhead.py", "--device", "cuda", "--quick", "--json", str(out)], 240
        )
        if proc.returncode != 0 or not out.exists():
            return Result("overhead", False, (proc.stderr.strip().splitlines() or ["?"])[-1])
        print(proc.stdout)  # the overhead table itself, for the README
        rows = json.loads(out.read_text()).get("rows", [])
    syncs = [r for r in rows if r.get("variant") in ("warn", "log") and r.get("syncs", 0) > 0]
    detail = f"{len(rows)} rows; warn/log syncs/step: {'none' if not syncs else len(syncs)}"
    return Result("overhead", not syncs, detail)


RUNNERS: dict[str, Callable[[torch.device], Result]] = {
    "cuda-tests": check_cuda_tests,
    "findings": check_findings,
    "strict": check_strict,
    "amp": check_amp,
    "fused": check_fused,
    "overhead": check_overhead,
}


def table(results: Sequence[Result], device: str) -> str:
    lines = [
        f"gradguard GPU check on {device}, torch {torch.__version__}",
        "| check | result | seconds | detail |",
        "| --- | --- | ---: | --- |",
    ]
    for r in results:
        lines.append(f"| {r.check} | {'pass' if r.ok else 'FAIL'} | {r.seconds:.0f} | {r.detail} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would run; exit 0")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--only", help=f"comma-separated checks, of: {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    chosen = list(CHECKS) if args.only is None else [c.strip() for c in args.only.split(",")]
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: use cuda or cpu")
    if args.dry_run:
        print(f"would run on {args.device}, in this order:")
        for name in chosen:
            print(f"  {name}: {(RUNNERS[name].__doc__ or '').strip() or name}")
        print(f"  over the loops: {', '.join(f'{n} ({loop.code})' for n, loop in LOOPS.items())}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False; try --dry-run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.use_deterministic_algorithms(True)
    # Findings in log mode go to the log; this prints the table only.
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    results = []
    for check in chosen:
        start = time.perf_counter()
        try:
            result = RUNNERS[check](device)
        except Exception as exc:  # one broken check must not hide the others
            result = Result(check, False, f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - start
        results.append(result)
        print(f"{check}: {'pass' if result.ok else 'FAIL'}", file=sys.stderr, flush=True)
    print(table(results, f"{name}, {time.strftime('%Y-%m-%d')}"))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
