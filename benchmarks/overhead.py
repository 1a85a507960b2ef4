"""What gradguard costs per training step, next to the tools users would otherwise use.

Every workload trains with AdamW on fixed synthetic data; one step is
``zero_grad, forward, loss, backward, step``. Each variant gets its own copy
of the model, built from the same seed. After a warm-up, the run goes in
rounds: in every round each variant runs a block of steps, in a freshly
shuffled order, and each step is timed on its own. A variant's ratio for the
round is the median of its step times divided by the median of its
baseline's (the plain loop, unless the table says otherwise) in that same
round, so slow drifts of the machine cancel. The table shows the median of
those ratios over the rounds and their interquartile range, on two clocks:
wall time, and the process's CPU time. With one thread on the CPU the two
measure the same work, but CPU time leaves out the time other processes took
on a shared machine, so the budget is judged on it there (``--clock``).

Each row also shows, in microseconds, the variant's median step time minus
its baseline's in the same round (the median over the rounds): for a
workload whose step is short, what gradguard costs reads better that way.

The ``trainer`` workload is a small GPT-2 trained by ``transformers.Trainer``
(skipped without transformers): the Trainer owns its loop, so a block there
is one ``train()`` of a fresh Trainer, timed from one ``on_step_end`` to the
next (`TrainerRunner`).

Separately, a few steps of each variant run under a ``TorchDispatchMode``
that counts the tensor ops dispatched and the host-device syncs
(``aten._local_scalar_dense`` and ops whose output shape depends on data);
the table reports the variant's count minus its baseline's, per step.

    python benchmarks/overhead.py --quick                   # about a minute
    python benchmarks/overhead.py --json overhead.json      # the full table, ~15 minutes
    python benchmarks/overhead.py --workloads mlp,many-params --variants plain,warn
    python benchmarks/overhead.py --workloads trainer       # about a minute
    python benchmarks/overhead.py --workloads mlp-compiled-step   # torch.compile(opt.step)

A workload whose step is compiled (``torch.compile(opt.step)``, inductor) also
reports the graph breaks dynamo counted while compiling each variant's step;
a guard must add none.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib.util
import inspect
import io
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard

SEED = 0
Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


# -- workloads ---------------------------------------------------------------


class MLP(nn.Module):
    """Four 512-wide linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 shaped for 3x32x32 inputs (62 parameter tensors)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class GPTBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-like language model (78 parameter tensors)."""

    def __init__(self, vocab: int = 1000, seq: int = 128, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(GPTBlock(d, heads) for _ in range(6)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class Chain(nn.Module):
    """500 Linear(16, 16) in sequence: 1,000 small parameter tensors.

    Orthogonal weights keep activations and gradients at a steady scale
    through the 500 layers, so no step slows down on denormal numbers.
    """

    def __init__(self, depth: int = 500, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        for layer in self.layers:
            assert isinstance(layer, nn.Linear)
            nn.init.orthogonal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _xent(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _lm(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.flatten(0, 1), batch[1].flatten())


def _tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 built from a config (no download): 28 parameter tensors."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=256,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model


def _tokens(g: torch.Generator) -> Batch:
    ids = torch.randint(0, 256, (8, 64), generator=g)
    return ids, ids


def _model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss a transformers model computes from its labels, as the Trainer asks it."""
    loss: torch.Tensor = model(input_ids=batch[0], labels=batch[1]).loss
    return loss


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its data and its loss, plus how long to time it.

    ``block``/``rounds``: steps per variant per round and rounds, for the full
    run; ``quick``: the same for ``--quick`` (``None``: skipped by ``--quick``
    unless named in ``--workloads``).
    """

    name: str
    describe: str
    model: Callable[[], nn.Module]
    data: Callable[[torch.Generator], Batch]
    loss: LossFn
    block: int
    rounds: int
    quick: tuple[int, int] | None
    lr: float = 1e-3
    slow: bool = False  # seconds per step: one warm-up step and one counted step
    zero_grad: bool = True
    variants: tuple[str, ...] | None = None  # None: every variant a plain loop can run
    requires: tuple[str, ...] = ()  # modules it needs; without them it is skipped
    trainer: bool = False  # trained by transformers.Trainer (`TrainerRunner`)
    compile_step: bool = False  # step = torch.compile(opt.step), after the guard attaches
    named_only: bool = False  # run only when named in --workloads

    def runs(self, variant: Variant) -> bool:
        """Whether this workload runs ``variant``."""
        if self.variants is not None:
            return variant.name in self.variants
        return not (variant.session or variant.eager_step)

    def missing(self) -> list[str]:
        """The modules in ``requires`` that are not installed."""
        return [name for name in self.requires if importlib.util.find_spec(name) is None]


WORKLOADS = {
    w.name: w
    for w in (
        Workload(
            "mlp",
            "4x Linear(512, 512), batch 128",
            MLP,
            lambda g: (torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g)),
            _mse,
            block=15,
            rounds=25,
            quick=(8, 5),
        ),
        Workload(
            "cnn",
            "ResNet-18, 3x32x32, batch 16",
            ResNet18,
            lambda g: (
                torch.randn(16, 3, 32, 32, generator=g),
                torch.randint(0, 10, (16,), generator=g),
            ),
            _xent,
            block=2,
            rounds=10,
            quick=None,
            slow=True,
        ),
        Workload(
            "transformer",
            "GPT, 6 layers, d_model 256, 4 heads, seq 128, vocab 1000, batch 8",
            GPT,
            lambda g: (
                torch.randint(0, 1000, (8, 128), generator=g),
                torch.randint(0, 1000, (8, 128), generator=g),
            ),
            _lm,
            block=3,
            rounds=10,
            quick=(1, 2),
            slow=True,
        ),
        Workload(
            "many-params",
            "500x Linear(16, 16) in sequence, batch 32: 1,000 parameter tensors",
            Chain,
            lambda g: (torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)),
            _mse,
            lr=1e-4,
            block=9,
            rounds=25,
            quick=(4, 5),
        ),
        Workload(
            "mlp-no-zero-grad",
            "the mlp loop with zero_grad missing: GG101 fires at every step",
            MLP,
            lambda g: (torch.randn(128, 512, generator=g), torch.randn(128, 512, generator=g)),
            _mse,
            block=15,
            rounds=25,
            quick=(8, 5),
            zero_grad=False,
            variants=("plain", "log", "floor"),
        ),
        Workload(
            "trainer",
            "transformers.Trainer on a GPT-2 from a config: 2 layers, n_embd 64, 2 heads, "
            "seq 64, vocab 256, batch 8; the Trainer clips (max_grad_norm 1.0)",
            _tiny_gpt2,
            _tokens,
            _model_loss,
            block=20,
            rounds=25,
            quick=(8, 3),
            requires=("transformers", "accelerate"),
            trainer=True,
            variants=("plain", "warn", "install", "floor"),
        ),
        Workload(
            "mlp-compiled-step",
            "the mlp at batch 8 with step = torch.compile(opt.step): the step is most of it",
            MLP,
            lambda g: (torch.randn(8, 512, generator=g), torch.randn(8, 512, generator=g)),
            _mse,
            block=15,
            rounds=25,
            quick=(8, 5),
            variants=("plain", "log", "warn", "floor", "eager-step"),
            compile_step=True,
            named_only=True,  # compiling takes a minute, and needs a C++ compiler on the CPU
        ),
    )
}


# -- variants ----------------------------------------------------------------

Detach = Callable[[], None]

# gradguard.guard's keyword arguments that are not optional checks.
_GUARD_BASICS = {"model", "mode", "ignore"}
# THE place to extend the "all" variant: options of gradguard.guard that are
# not booleans defaulting to False (those are switched on automatically), as
# name -> the value that turns the check on for every step.
ALL_CHECKS_EXTRA: dict[str, Any] = {}


def all_checks_options() -> dict[str, Any]:
    """Keyword arguments that switch on every optional check `gradguard.guard` accepts."""
    options: dict[str, Any] = {}
    for name, p in inspect.signature(gradguard.guard).parameters.items():
        if p.kind is p.KEYWORD_ONLY and name not in _GUARD_BASICS and p.default is False:
            options[name] = True
    options.update(ALL_CHECKS_EXTRA)
    return options


def _guarded(mode: str, **options: Any) -> Callable[[nn.Module, torch.optim.Optimizer], Detach]:
    def attach(model: nn.Module, opt: torch.optim.Optimizer) -> Detach:
        gradguard.guard(opt, model=model, mode=mode, **options)

        def detach() -> None:
            gradguard.unguard(opt)

        return detach

    return attach


def _nothing(model: nn.Module, opt: torch.optim.Optimizer) -> Detach:
    return lambda: None


def _noop_hook(*args: object) -> None:
    return None


def _floor(model: nn.Module, opt: torch.optim.Optimizer) -> Detach:
    """A no-op post-accumulate hook per parameter and no-op step hooks: the least any hook costs."""
    handles = [
        p.register_post_accumulate_grad_hook(_noop_hook)
        for p in model.parameters()
        if p.requires_grad
    ]
    handles.append(opt.register_step_pre_hook(_noop_hook))
    handles.append(opt.register_step_post_hook(_noop_hook))

    def detach() -> None:
        for h in handles:
            h.remove()

    return detach


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the same training step."""

    name: str
    describe: str
    attach: Callable[[nn.Module, torch.optim.Optimizer], Detach] = _nothing
    anomaly: bool = False  # forward and backward inside detect_anomaly
    clip: bool = False  # clip_grad_norm_(..., error_if_nonfinite=True) before the step
    baseline: str = "plain"
    gradguard: bool = False
    # gradguard.install(mode="warn") around the run instead of ``attach``: the
    # session finds the optimizer at its first step, as ``gradguard run`` does.
    # Process-wide, so only for a runner that gives each variant's block the
    # process to itself: the Trainer's.
    session: bool = False
    eager_step: bool = False  # in a compiled-step workload: the step left uncompiled


def make_variants() -> dict[str, Variant]:
    """Every variant, with "all" built from what `gradguard.guard` accepts today."""
    options = all_checks_options()
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "no optional checks exist yet"
    return {
        v.name: v
        for v in (
            Variant("plain", "the loop as written"),
            Variant("log", "gradguard, mode='log'", _guarded("log"), gradguard=True),
            Variant(
                "warn", "gradguard, mode='warn' (the default)", _guarded("warn"), gradguard=True
            ),
            Variant("strict", "gradguard, mode='strict'", _guarded("strict"), gradguard=True),
            Variant(
                "all",
                f"gradguard, mode='warn', every check on ({shown})",
                _guarded("warn", **options),
                gradguard=True,
            ),
            Variant("floor", "no-op post-accumulate hook per parameter + no-op step hooks", _floor),
            Variant(
                "anomaly",
                "torch.autograd.set_detect_anomaly(True) around forward and backward",
                anomaly=True,
            ),
            Variant(
                "clip",
                "clip_grad_norm_(params, 1.0, error_if_nonfinite=True) before each step",
                clip=True,
            ),
            Variant(
                "warn+clip",
                "gradguard warn on the clip loop; ratio to clip (in-place change: device check)",
                _guarded("warn"),
                clip=True,
                baseline="clip",
                gradguard=True,
            ),
            Variant(
                "install",
                "gradguard.install(mode='warn') around the run, as gradguard run (Trainer only)",
                gradguard=True,
                session=True,
            ),
            Variant(
                "eager-step",
                "a compiled-step workload with opt.step not compiled: what compiling saves",
                eager_step=True,
            ),
        )
    }


# -- running -----------------------------------------------------------------


class _Own:
    """A variant's workload and device, and its own copy of the model."""

    def __init__(
        self,
        workload: Workload,
        variant: Variant,
        device: torch.device,
        model: nn.Module | None = None,
    ) -> None:
        self.workload = workload
        self.variant = variant
        self.device = device
        self.graph_breaks: int | None = None  # a compiled step's, counted while it is built
        if model is None:
            torch.manual_seed(SEED)
            model = workload.model()
        # A copy, so every variant starts from the same weights without paying
        # for the initialisation again (500 orthogonal inits take a second).
        self.model = copy.deepcopy(model).to(device)
        self._prepare()

    def _prepare(self) -> None:
        """Everything else the runner trains with."""


class Runner(_Own):
    """One variant's own model, optimizer and data, stepping on demand."""

    def _prepare(self) -> None:
        g = torch.Generator().manual_seed(SEED)
        self.batches = [tuple(t.to(self.device) for t in self.workload.data(g)) for _ in range(4)]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.workload.lr)
        self.detach = self.variant.attach(self.model, self.opt)
        compiled = self.workload.compile_step and not self.variant.eager_step
        self.opt_step = torch.compile(self.opt.step) if compiled else self.opt.step
        self.i = 0

    def step(self) -> None:
        """One training step, exactly as the variant's user would write it."""
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.workload.zero_grad:
            self.opt.zero_grad()
        anomaly = (
            torch.autograd.set_detect_anomaly(True, check_nan=True)
            if self.variant.anomaly
            else contextlib.nullcontext()
        )
        with anomaly:
            loss = self.workload.loss(self.model, batch)  # type: ignore[arg-type]
            loss.backward()
        if self.variant.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, error_if_nonfinite=True)
        self.opt_step()

    def warm_up(self, steps: int) -> None:
        """Run ``steps`` untimed steps."""
        for _ in range(steps):
            self.step()

    def count(self, steps: int) -> tuple[float, float]:
        """Ops and syncs per step over ``steps`` steps."""
        ops, syncs, _ = count_per_step(self.step, steps)
        return ops, syncs

    def timed_block(self, steps: int) -> list[tuple[float, float]]:
        """Run ``steps`` steps; return each one's (wall, CPU) time in seconds."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else _no_sync
        wall, cpu = time.perf_counter, time.process_time
        out = []
        sync()
        for _ in range(steps):
            w0, c0 = wall(), cpu()
            self.step()
            sync()
            out.append((wall() - w0, cpu() - c0))
        return out

    def findings(self) -> str:
        """gradguard's findings on this runner's optimizer, as ``CODExcount``."""
        if not self.variant.gradguard:
            return ""
        g = gradguard.guard_of(self.opt)
        if g is None:
            return "GUARD FAILED (see stderr)"
        counts: Counter[str] = Counter()
        for finding, n in g.counts.items():
            counts[finding.code] += n
        return " ".join(f"{code}x{n}" for code, n in sorted(counts.items()))


def _no_sync() -> None:
    return None


class TrainerRunner(_Own):
    """One variant's model trained by ``transformers.Trainer``, a fresh Trainer per block.

    The Trainer owns the loop, so a block is one ``train()`` of `SETTLING`
    steps more than it times: each step is timed from one ``on_step_end`` to
    the next (batch, forward, backward, the Trainer's clip, the step, the
    scheduler, ``zero_grad``, the callbacks), and the first ones not at all:
    a new optimizer's (AdamW's state; for a guard, the step it attaches at,
    and the next, where it learns the Trainer clips). The variant attaches
    from ``on_train_begin`` to the torch optimizer the Trainer made and
    detaches at ``on_train_end``, as a user's callback would; a session
    variant wraps ``train()`` in ``gradguard.install``/``uninstall``. The
    model keeps training from block to block.
    """

    SETTLING = 2  # steps of each Trainer left out

    def _prepare(self) -> None:
        import transformers

        transformers.logging.set_verbosity_error()  # no config notes in the table
        g = torch.Generator().manual_seed(SEED)
        self.data = _Rows([self.workload.data(g) for _ in range(4)])
        self.batch = len(self.data.batches[0][0])
        self._dir = tempfile.TemporaryDirectory(prefix="gradguard-overhead-")
        self._found: Counter[str] = Counter()
        self._failed = False

    def warm_up(self, steps: int) -> None:
        """Train ``steps`` untimed steps (one Trainer)."""
        self._train(steps, lambda i, wall, cpu: None)

    def count(self, steps: int) -> tuple[float, float]:
        """Ops and syncs per step over ``steps`` steps after a Trainer's settling ones."""
        counter = OpCounter()
        on = False

        def at(i: int, wall: float, cpu: float) -> None:
            nonlocal on
            if i == self.SETTLING:
                counter.__enter__()
                on = True
            elif i == self.SETTLING + steps:
                counter.__exit__(None, None, None)
                on = False

        try:
            self._train(self.SETTLING + steps, at)
        finally:
            if on:
                counter.__exit__(None, None, None)
        return counter.ops / steps, counter.syncs / steps

    def timed_block(self, steps: int) -> list[tuple[float, float]]:
        """Train ``steps`` steps after the settling ones; return each one's (wall, CPU) time."""
        ends: list[tuple[float, float]] = []

        def at(i: int, wall: float, cpu: float) -> None:
            if i >= self.SETTLING:
                ends.append((wall, cpu))

        self._train(self.SETTLING + steps, at)
        return [(w1 - w0, c1 - c0) for (w0, c0), (w1, c1) in itertools.pairwise(ends)]

    def findings(self) -> str:
        """gradguard's findings over every block, as ``CODExcount``."""
        if not self.variant.gradguard:
            return ""
        if self._failed:
            return "GUARD FAILED (see stderr)"
        return " ".join(f"{code}x{n}" for code, n in sorted(self._found.items()))

    def detach(self) -> None:
        """Remove the Trainer's output directory (it writes nothing there)."""
        self._dir.cleanup()

    def _train(self, steps: int, at_step_end: Callable[[int, float, float], None]) -> None:
        import transformers

        args = transformers.TrainingArguments(
            output_dir=self._dir.name,
            per_device_train_batch_size=self.batch,
            max_steps=steps,
            learning_rate=self.workload.lr,
            seed=SEED,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=self.device.type == "cpu",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        callback = _trainer_callback()(self, at_step_end)
        trainer = transformers.Trainer(
            model=self.model, args=args, train_dataset=self.data, callbacks=[callback]
        )
        trainer.remove_callback(transformers.PrinterCallback)  # its end-of-run line
        if not self.variant.session:
            trainer.train()
            return
        gradguard.install(mode="warn")
        try:
            trainer.train()
            guarded = gradguard.guard_of(_torch_optimizer(trainer.optimizer)) is not None
        finally:
            rows = gradguard.uninstall()
        self._found.update({row.code: row.count for row in rows})
        self._failed = self._failed or not guarded

    def attached(self, model: nn.Module, opt: torch.optim.Optimizer) -> Detach:
        """Attach the variant from a Trainer callback; the detach keeps what it found."""
        detach = self.variant.attach(model, opt)

        def done() -> None:
            if self.variant.gradguard:
                g = gradguard.guard_of(opt)
                if g is None:
                    self._failed = True
                else:
                    for finding, n in g.counts.items():
                        self._found[finding.code] += n
            detach()

        return done


class _Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Rows of a few fixed batches, cycled: long enough for any block in one epoch."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.rows = sum(len(b[0]) for b in batches)

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i %= self.rows
        ids, labels = self.batches[i // len(self.batches[0][0])]
        j = i % len(ids)
        return {"input_ids": ids[j], "labels": labels[j]}


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a Trainer's (Accelerate's wrapper holds it)."""
    return getattr(opt, "optimizer", opt)  # type: ignore[no-any-return]


@functools.cache
def _trainer_callback() -> type:
    """The ``TrainerCallback`` a `TrainerRunner` trains with (transformers imported late)."""
    import transformers

    class Callback(transformers.TrainerCallback):
        def __init__(
            self, runner: TrainerRunner, at_step_end: Callable[[int, float, float], None]
        ) -> None:
            self.runner = runner
            self.at_step_end = at_step_end
            self.steps = 0
            self.detach: Detach = _nothing_to_detach

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not self.runner.variant.session:
                opt = _torch_optimizer(kw["optimizer"])
                self.detach = self.runner.attached(kw["model"], opt)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            self.steps += 1
            self.at_step_end(self.steps, wall, cpu)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.detach()

    return Callback


def _nothing_to_detach() -> None:
    return None


# -- counting ops and syncs --------------------------------------------------

_ATEN = torch.ops.aten
# Ops whose result the host must wait for: a scalar read, or an output shape
# that depends on the data.
_SYNC_OPS = {
    _ATEN._local_scalar_dense.default,
    _ATEN.nonzero.default,
    _ATEN.masked_select.default,
    _ATEN.equal.default,
    _ATEN.allclose.default,
    _ATEN._unique2.default,
    _ATEN.unique_dim.default,
    _ATEN.unique_consecutive.default,
    _ATEN.repeat_interleave.Tensor,
}


def _is_sync(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    if func in _SYNC_OPS:
        return True
    if func is _ATEN.index.Tensor:  # boolean-mask indexing runs nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
    if func in (_ATEN._to_copy.default, _ATEN.copy_.default):  # blocking device-to-host copy
        src = args[1] if func is _ATEN.copy_.default else args[0]
        dst_cpu = (
            args[0].device.type == "cpu"
            if func is _ATEN.copy_.default
            else str(kwargs.get("device", src.device)).startswith("cpu")
        )
        return src.device.type != "cpu" and dst_cpu and not kwargs.get("non_blocking", False)
    return False


def _written_lists(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an op writes through a list argument (``_foreach_*_`` ops)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    out: list[torch.Tensor] = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, (list, tuple)):
            out += [t for t in value if isinstance(t, torch.Tensor)]
    return out


class OpCounter(TorchDispatchMode):
    """Counts dispatched tensor ops and host-device syncs while active.

    Under any ``TorchDispatchMode``, torch 2.x does not bump the version
    counters of tensors written by in-place ``_foreach_*`` ops (so
    ``clip_grad_norm_`` would look like it changed nothing). gradguard reads
    those counters, so the counter bumps them itself, as outside the mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        self.by_op[str(func)] += 1
        if _is_sync(func, args, kwargs):
            self.syncs += 1
        written = _written_lists(func, args, kwargs)
        before = [t._version for t in written]
        out = func(*args, **kwargs)
        for t, version in zip(written, before, strict=True):
            if t._version == version:
                torch.autograd.graph.increment_version(t)
        return out


def count_per_step(step: Callable[[], None], steps: int) -> tuple[float, float, Counter[str]]:
    """Ops and syncs per step over ``steps`` calls of ``step``."""
    with OpCounter() as counter:
        for _ in range(steps):
            step()
    return counter.ops / steps, counter.syncs / steps, counter.by_op


# -- the run -----------------------------------------------------------------


_Summary = TypeVar("_Summary", bound="Ratio")


@dataclasses.dataclass
class Ratio:
    """A variant's per-round ratios to its baseline on one clock, summarised."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float

    @classmethod
    def of(cls: type[_Summary], ratios: Sequence[float]) -> _Summary:
        """Median, quartiles and extremes of ``ratios``."""
        return cls(
            median=statistics.median(ratios),
            q1=_quantile(ratios, 0.25),
            q3=_quantile(ratios, 0.75),
            lo=min(ratios),
            hi=max(ratios),
        )

    def __str__(self) -> str:
        return f"x{self.median:.3f} ({self.q1:.3f}-{self.q3:.3f})"


class Micros(Ratio):
    """A variant's per-round time over its baseline's, in microseconds per step."""

    def __str__(self) -> str:
        return f"{self.median:+.0f} us ({self.q1:+.0f} to {self.q3:+.0f})"


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    workload: str
    variant: str
    baseline: str
    cpu: Ratio
    wall: Ratio
    # Per round: the variant's median step time minus its baseline's, in µs.
    cpu_us: Micros
    wall_us: Micros
    step_ms: float  # median wall time of one step
    ops: float  # per step, minus the baseline's
    syncs: float  # per step, minus the baseline's
    rounds: int
    block: int
    findings: str
    graph_breaks: int | None = None  # a compiled step's, while compiling; else None

    def ratio(self, clock: str) -> Ratio:
        """The ratio on ``clock`` ("cpu" or "wall")."""
        return self.cpu if clock == "cpu" else self.wall

    def micros(self, clock: str) -> Micros:
        """The µs per step over the baseline on ``clock`` ("cpu" or "wall")."""
        return self.cpu_us if clock == "cpu" else self.wall_us


def _quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_workload(
    workload: Workload,
    variants: list[Variant],
    *,
    block: int,
    rounds: int,
    warmup: int,
    count_steps: int,
    device: torch.device,
    log: Callable[[str], None],
) -> list[Row]:
    """Warm up, count ops and syncs, then time every variant in interleaved rounds."""
    everything = make_variants()
    variants = list(variants)
    for v in list(variants):  # a ratio needs its baseline in the same round
        if v.baseline not in {u.name for u in variants}:
            variants.insert(0, everything[v.baseline])
    torch.manual_seed(SEED)
    model = workload.model()
    make = TrainerRunner if workload.trainer else Runner
    runners = {v.name: make(workload, v, device, model) for v in variants}

    counts: dict[str, tuple[float, float]] = {}
    for name, r in runners.items():
        # The log mode's one report goes to stderr; keep the table readable.
        with contextlib.redirect_stderr(io.StringIO()):
            before = _graph_breaks() if workload.compile_step else 0
            r.warm_up(warmup)  # the first step compiles a compiled step
            if workload.compile_step and not r.variant.eager_step:
                r.graph_breaks = _graph_breaks() - before
            counts[name] = r.count(count_steps)
        if (
            isinstance(r, Runner)
            and device.type == "cuda"
            and not (r.variant.anomaly or r.variant.clip)
        ):
            _check_no_cuda_sync(r, log)

    # Everything alive now lives until the end: a full collection before each
    # block would walk it every time (0.2 s with torch imported).
    gc.collect()
    gc.freeze()
    order = list(runners)
    walls: dict[str, list[float]] = {n: [] for n in order}
    ratios: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in order}
    extra: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in order}
    rng = random.Random(SEED)
    for i in range(rounds):
        rng.shuffle(order)
        medians: dict[str, tuple[float, float]] = {}
        for name in order:
            gc.collect()  # outside the timed block, so no variant inherits another's garbage
            times = runners[name].timed_block(block)
            medians[name] = (
                statistics.median(t[0] for t in times),
                statistics.median(t[1] for t in times),
            )
            walls[name] += [t[0] for t in times]
        for name in order:
            base = medians[runners[name].variant.baseline]
            ratios[name]["wall"].append(medians[name][0] / base[0])
            ratios[name]["cpu"].append(medians[name][1] / base[1])
            extra[name]["wall"].append((medians[name][0] - base[0]) * 1e6)
            extra[name]["cpu"].append((medians[name][1] - base[1]) * 1e6)
        log(f"  {workload.name}: round {i + 1}/{rounds}")

    rows = []
    for v in variants:
        base_ops, base_syncs = counts[v.baseline]
        rows.append(
            Row(
                workload=workload.name,
                variant=v.name,
                baseline=v.baseline,
                cpu=Ratio.of(ratios[v.name]["cpu"]),
                wall=Ratio.of(ratios[v.name]["wall"]),
                cpu_us=Micros.of(extra[v.name]["cpu"]),
                wall_us=Micros.of(extra[v.name]["wall"]),
                step_ms=statistics.median(walls[v.name]) * 1e3,
                ops=counts[v.name][0] - base_ops,
                syncs=counts[v.name][1] - base_syncs,
                rounds=rounds,
                block=block,
                findings=runners[v.name].findings(),
                graph_breaks=runners[v.name].graph_breaks,
            )
        )
    gc.unfreeze()
    for r in runners.values():
        r.detach()
    return rows


def _graph_breaks() -> int:
    """Graph breaks dynamo has counted in this process (imported only by compiled steps)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _check_no_cuda_sync(runner: Runner, log: Callable[[str], None]) -> None:
    """Run one step with CUDA's sync debug mode set to error; log the outcome."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.step()
        verdict = "no sync"
    except RuntimeError as exc:
        verdict = f"SYNC: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log(f"  {runner.workload.name}/{runner.variant.name}: set_sync_debug_mode('error'): {verdict}")


# -- budget and output -------------------------------------------------------

# (workload, variant): the largest median ratio allowed.
BUDGET = {
    ("many-params", "warn"): 1.05,
    ("mlp", "warn"): 1.02,
    ("transformer", "warn"): 1.01,
    ("cnn", "warn"): 1.01,
    ("mlp-no-zero-grad", "log"): 1.20,
}
# (workload, variant): the most µs per step over the baseline allowed.
BUDGET_US = {
    ("trainer", "warn"): 100.0,
    ("trainer", "install"): 100.0,
}


def budget_lines(rows: list[Row], clock: str) -> list[str]:
    """One line per budget point the run measured, met or not."""
    lines = []
    plain_breaks = {r.workload: r.graph_breaks for r in rows if r.variant == r.baseline}
    for row in rows:
        key = (row.workload, row.variant)
        if key in BUDGET:
            limit = BUDGET[key]
            lines.append(_verdict(row, row.ratio(clock), clock, limit, f"x{limit:.2f}"))
        if key in BUDGET_US:
            limit = BUDGET_US[key]
            lines.append(_verdict(row, row.micros(clock), clock, limit, f"+{limit:.0f} us/step"))
        if row.variant in ("log", "warn", "all") and row.syncs > 0:
            lines.append(
                f"{row.workload}/{row.variant}: {row.syncs:g} syncs/step, limit 0: NOT MET"
            )
        if row.variant == "strict" and row.syncs > 1:
            lines.append(
                f"{row.workload}/{row.variant}: {row.syncs:g} syncs/step, limit 1: NOT MET"
            )
        base = plain_breaks.get(row.workload)
        if row.variant != row.baseline and row.graph_breaks is not None and base is not None:
            verdict = "met" if row.graph_breaks <= base else "NOT MET"
            lines.append(
                f"{row.workload}/{row.variant}: {row.graph_breaks} graph breaks compiling "
                f"the step, limit {base} (plain's): {verdict}"
            )
    return lines


def _verdict(row: Row, measured: Ratio, clock: str, limit: float, shown: str) -> str:
    verdict = "met" if measured.median <= limit else "NOT MET"
    return (
        f"{row.workload}/{row.variant}: {measured} on the {clock} clock, limit {shown}: {verdict}"
    )


def table(rows: list[Row], clock: str) -> str:
    """The results as a Markdown table, ``clock``'s ratio first."""
    other = "wall" if clock == "cpu" else "cpu"
    breaks = any(r.graph_breaks is not None for r in rows)  # a column only where compiled
    out = [
        f"| workload | variant | vs | ratio, {clock} (IQR) | ratio, {other} (IQR) | "
        f"extra per step, {clock} (IQR) | step ms | ops/step | syncs/step | findings |"
        + (" graph breaks |" if breaks else ""),
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |"
        + (" ---: |" if breaks else ""),
    ]
    for r in rows:
        same = r.variant == r.baseline
        first = "1" if same else str(r.ratio(clock))
        second = "1" if same else str(r.ratio(other))
        us = "" if same else str(r.micros(clock))
        ops = "" if same else f"{r.ops:+g}"
        syncs = "" if same else f"{r.syncs:+g}"
        gb = "" if r.graph_breaks is None else str(r.graph_breaks)
        out.append(
            f"| {r.workload} | {r.variant} | {r.baseline} | {first} | {second} | {us} | "
            f"{r.step_ms:.1f} | {ops} | {syncs} | {r.findings} |" + (f" {gb} |" if breaks else "")
        )
    return "\n".join(out)


def _csv(value: str | None, known: Sequence[str], what: str) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--{what}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen workloads and print the table."""
    variants = make_variants()
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about a minute: fewer rounds, and cnn only if named",
    )
    parser.add_argument(
        "--workloads", help=f"comma-separated, from: {', '.join(WORKLOADS)} (default: all)"
    )
    parser.add_argument(
        "--variants", help=f"comma-separated, from: {', '.join(variants)} (default: all)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="the clock the budget is judged on; both are always shown. auto (default): "
        "cpu (this process's CPU time, which leaves out time other processes took on a "
        "shared machine) for a 1-thread CPU run, else wall",
    )
    parser.add_argument("--rounds", type=int, help="override every workload's round count")
    parser.add_argument("--block", type=int, help="override every workload's steps per block")
    args = parser.parse_args(argv)

    workload_names = _csv(args.workloads, list(WORKLOADS), "workloads")
    variant_names = _csv(args.variants, list(variants), "variants")
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1; got {args.threads}")
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # settable only before any parallel work
        torch.set_num_interop_threads(args.threads)
    # detect_anomaly warns whenever it is switched on; gradguard's warnings stay visible.
    warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    chosen = workload_names or [
        n
        for n, w in WORKLOADS.items()
        if not w.named_only and (not args.quick or w.quick is not None)
    ]
    header = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradguard": gradguard.__version__,
        "machine": f"{platform.machine()}, {_cpu_count()} CPUs",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "clock": clock,
        "command": " ".join(["python", "benchmarks/overhead.py", *(argv or sys.argv[1:])]),
    }
    print(" | ".join(f"{k}: {v}" for k, v in header.items()))
    for v in variants.values():
        if variant_names is None or v.name in variant_names:
            print(f"  {v.name}: {v.describe}")

    rows: list[Row] = []
    started = time.perf_counter()
    for name in chosen:
        w = WORKLOADS[name]
        if args.quick:
            block, rounds = w.quick or (1, 2)
        else:
            block, rounds = w.block, w.rounds
        block, rounds = args.block or block, args.rounds or rounds
        missing = w.missing()
        if missing:
            log(f"{name}: skipped, {' and '.join(missing)} not installed")
            continue
        picked = [
            v
            for v in variants.values()
            if (variant_names is None or v.name in variant_names) and w.runs(v)
        ]
        log(f"{name}: {w.describe}; {len(picked)} variants, {rounds} rounds of {block} steps")
        rows += run_workload(
            w,
            picked,
            block=block,
            rounds=rounds,
            warmup=1 if args.quick or w.slow else 3,
            count_steps=1 if args.quick or w.slow else 2,
            device=device,
            log=log,
        )
    elapsed = time.perf_counter() - started

    print()
    print(table(rows, clock))
    print()
    lines = budget_lines(rows, clock)
    if lines:
        print("Budget (median ratio over rounds, IQR in parentheses):")
        for line in lines:
            print(f"  {line}")
    print(f"\n{len(rows)} rows in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "header": header,
                    "rows": [dataclasses.asdict(r) for r in rows],
                    "budget": lines,
                    "seconds": elapsed,
                },
                f,
                indent=2,
            )
    return 0


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
