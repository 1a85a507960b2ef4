"""Random op sequences against an independent reference model of what must be reported.

The reference below knows nothing of hooks, versions or weak references: it
tracks, per parameter, what the gradient *contains* (fresh backward output,
content a step already applied, nothing) and derives the findings from the
definitions of GG101-GG103. gradguard must report exactly that, except in three
documented blind spots where it may stay silent (never where it may report
more):

* an in-place clear that no zero_grad wrapper sees (``model.zero_grad(
  set_to_none=False)``) leaves the zeros a sanitising ``nan_to_num_`` leaves
  of a NaN backward: it is told apart only from its second time, and only
  while no other fresh gradient was rewritten in place (clipped) since its
  backward (``tests/test_clearing_bugs.py`` pins down when);
* a gradient clipped after a step and then accumulated onto looks rescaled
  rather than stale;
* a gradient holding NaN that was changed in place since gradguard saw it
  (clipped, cleared) is not judged by its value: that is GG201's business.

A gradient written since the last step with no backward in between (assigned,
copied into, or rescaled in place: ``clip`` after a step) is new content
written by hand, so stepping on it is neither GG101 nor GG103; a frozen
layer's is not, since nothing writes a frozen layer's gradient on purpose.

One place where gradguard may report more than the reference: a gradient
holding content a step applied (re-applied, or stale: a backward onto it),
cleared by something no zero_grad wrapper sees, then written over by hand
before the step, looks exactly like that gradient averaged or clipped by hand
(``p.grad = p.grad / n``), which is still stale; GG101 may name it.

Gradients are written by hand only into parameters gradguard has hooked: one
frozen before gradguard saw it holds, when first hooked, what a backward it
could not watch wrote, by design.

What the events mean for the findings:

* ``scaler_skip`` is an AMP iteration whose loss overflowed: backward writes
  NaN, the ``GradScaler`` unscales in place and skips the optimizer step, so
  no step hook runs. For GG101-GG103 the skipped step does not exist: its
  backward is fresh output no step applied; a later clear loses it (GG102 if
  a step then runs with no new backward); accumulated onto a gradient a step
  applied, it is stale. A step that does apply NaN makes the weights NaN, so
  every later backward writes NaN too.
* ``freeze``/``unfreeze`` toggle the encoder's ``requires_grad``. A frozen
  parameter gets no backward, but torch's optimizers still apply whatever
  gradient it holds: a stale one is GG101; a cleared one is no GG102, since
  applying nothing is what freezing asks for. With ``frozen`` the encoder is
  frozen before the optimizer exists, so gradguard hooks it only once
  unfrozen.
* ``grow`` adds a layer to the loss and its parameters to the optimizer with
  ``add_param_group``; from then on they are judged like the others.

A second optimizer steps a discriminator, ``disc``, on the model's output, as
in a GAN: ``backward_through`` runs through both (the generator's loss),
``backward_disc`` through ``disc`` only (its input detached); ``step2`` and
``opt2_zero`` are its step and clear. ``eval``/``train`` switch the model's
mode, so a backward can run in eval mode (validation). The reference tracks,
per parameter, the window of backward passes accumulated since its last step
or clear, and derives GG106 from its definitions:

* the window holds a pass in eval mode and one in train mode (the validation
  leak);
* the pass that began the window is one the other optimizer stepped (it began
  or ended a window of the other's parameters at that step), before the
  window's last pass ran, and no pass from that last one on wrote into the
  other optimizer's parameters (the GAN leak).

Where a gradient was written by hand into the window, or holds NaN and was
changed in place, gradguard may miss or add GG106.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from conftest import Net, loss_of
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradguard
import gradguard.testing

EXAMPLES = int(os.environ.get("GRADGUARD_FUZZ_EXAMPLES", "2000" if os.environ.get("CI") else "300"))

OPS = st.sampled_from(
    [
        "backward",
        "backward_head",
        "opt_zero",
        "opt_zero_inplace",
        "model_zero",
        "model_zero_inplace",
        "head_zero",
        "grad_none_0",
        "grad_none_3",
        "clip",
        "write",
        "assign",
        "scaler_skip",
        "grow",
        "freeze",
        "unfreeze",
        "step",
        "step",
        "step",
        "backward_through",
        "backward_disc",
        "step2",
        "step2",
        "opt2_zero",
        "eval",
        "train",
    ]
)

ENCODER = (0, 1)
HEAD = (2, 3)
EXTRA = (4, 5)


class FuzzNet(Net):
    """`Net` plus a layer that joins the loss, and the optimizer, when it grows."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.nn.Linear(4, 2)
        self.grown = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.extra(x) if self.grown else out


@dataclasses.dataclass
class Ref:
    """What one parameter's gradient holds, in terms of the findings' definitions."""

    has: bool = False  # .grad is a tensor
    content: bool = False  # it holds nonzero backward output
    applied_in: bool = False  # part of that content was applied by a step
    new: bool = False  # backward wrote to it since the last step
    lost: bool = False  # backward output since the last step was cleared
    lost_seen: bool = False  # ... by a clear gradguard can observe exactly
    lost_watched: bool = False  # ... by a clear a zero_grad wrapper saw
    moved: bool = False  # rewritten in place since its last backward
    blind_stale: bool = False  # clipped after a step, before the next backward
    handmade: bool = False  # assigned by hand since the last step, with no backward since
    rewritten: bool = False  # changed in place since the last step, with no backward since
    masked_stale: bool = False  # stale, then cleared where no wrapper sees, then written
    unhooked: bool = False  # frozen before gradguard saw it, and not hooked since
    member: bool = True  # the optimizer holds the parameter
    trainable: bool = True  # requires_grad
    nan: bool = False  # it holds NaN
    # GG106: the backward passes since the last step or clear (0: one before watching),
    # the modes they ran in (True: train), and whether a hand wrote into the window.
    # ``unsure``: the window was written by hand, or a backward joined it after it was
    # changed in place (gradguard then takes the backward for one beginning a window).
    # ``unseen``: the window was zeroed in place where no wrapper sees, so gradguard
    # still counts its passes as what a step applies, until the device says zeros.
    window: list[int] = dataclasses.field(default_factory=list)
    modes: set[bool] = dataclasses.field(default_factory=set)
    unsure: bool = False
    unseen: bool = False

    def backward(self, *, nan: bool = False, backward: int = 0, train: bool = True) -> None:
        if not self.new:
            self.window, self.modes, self.unsure = [], set(), False
        elif self.moved:
            self.unsure = True
        self.unseen = False
        self.window.append(backward)
        self.modes.add(train)
        self.blind_stale = self.blind_stale or (self.moved and self.applied_in)
        self.nan = nan or (self.has and self.nan)
        self.has = self.content = self.new = True
        self.lost = self.lost_seen = self.lost_watched = self.moved = self.handmade = False
        self.masked_stale = self.rewritten = False

    def clear(self, *, to_none: bool, seen: bool, watched: bool = False) -> None:
        self.unseen = self.new and not seen
        if self.new:
            self.lost = True
        if self.new or self.lost:
            self.lost_seen = self.lost_seen or seen
            self.lost_watched = self.lost_watched or watched
        applied = self.has and self.applied_in
        self.masked_stale = not watched and (applied or self.masked_stale)
        self.new = self.content = self.applied_in = self.blind_stale = self.nan = False
        self.handmade = self.rewritten = False
        self.has = self.has and not to_none
        self.moved = self.has and not seen

    def clip(self, *, nan: bool) -> None:
        if self.has:
            self.moved = True
            self.nan = self.nan or nan  # a NaN total norm scales every gradient to NaN
            self._rewrite(in_place=True)

    def write(self, *, in_place: bool, nan: bool) -> None:
        """New values copied into the gradient (or assigned, ``in_place=False``)."""
        if self.lost and not self.lost_watched:
            # A clear only the None it left showed: written over, it looks
            # like backward's output averaged by hand (``p.grad = p.grad / n``).
            self.lost_seen = False
        self.has = self.content = self.moved = True
        self.nan = nan
        self.unsure = self.unsure or self.new
        self._rewrite(in_place=in_place)

    def _rewrite(self, *, in_place: bool) -> None:
        # With no backward since the last step, whatever is there now was
        # written by hand; after a backward it is that backward's output
        # transformed (averaged, clipped), stale if that was. Whether an
        # in-place rewrite counts as by hand depends on requires_grad at the
        # step (`judged`).
        if self.new:
            return
        if in_place:
            self.rewritten = True
        else:
            self.handmade = self.content
            self.applied_in = False

    def join(self) -> None:
        # What is in .grad when gradguard starts watching came from a backward
        # no step of this optimizer applied.
        self.new = self.content = self.has
        self.window, self.modes = [0] if self.has else [], set()
        self.applied_in = self.lost = self.lost_seen = self.lost_watched = False
        self.moved = self.blind_stale = self.handmade = self.rewritten = self.masked_stale = False
        self.member = True

    @property
    def stale(self) -> bool:
        """Holds content a step applied: written in place since, a trainable one is by hand."""
        return self.has and self.applied_in and not (self.rewritten and self.trainable)

    @property
    def produced(self) -> bool:
        """Holds content produced since the last step: by backward, or by hand."""
        by_hand = self.rewritten and self.content and (self.trainable or not self.applied_in)
        return self.new or self.handmade or by_hand

    def step(self) -> None:
        self.unseen = False
        self.applied_in = self.has and self.content
        self.new = self.lost = self.lost_seen = self.lost_watched = False
        self.moved = self.handmade = self.masked_stale = self.rewritten = False


def expected(
    refs: list[Ref],
) -> tuple[dict[str, set[int]], dict[str, set[int]], dict[str, set[int]], bool]:
    """The findings a step must report, those it may miss or may add, and whether GG103 is due."""
    held = [i for i, r in enumerate(refs) if r.member]
    stale = {i for i in held if refs[i].stale}
    cleared = {i for i in held if refs[i].lost and not refs[i].new and refs[i].trainable}
    # Changed in place and NaN: no value to judge (GG201 reports it).
    unjudged = {i for i in held if refs[i].nan and refs[i].moved}
    may_miss = {
        "GG101": {i for i in stale if refs[i].blind_stale} | (stale & unjudged),
        "GG102": {i for i in cleared if not refs[i].lost_seen} | (cleared & unjudged),
        # What a parameter hooked late holds is taken for a backward's output.
        "GG103": unjudged,
    }
    trainable = any(refs[i].trainable for i in held)
    produced = any(refs[i].produced for i in held)
    gg103 = trainable and not produced and not stale and not cleared
    may_add = {
        "GG101": {
            i for i in held if refs[i].masked_stale and (refs[i].handmade or refs[i].rewritten)
        },
        "GG102": set(),
    }
    return {"GG101": stale, "GG102": cleared}, may_miss, may_add, gg103


@dataclasses.dataclass
class World:
    """The real models and optimizers of one example, and the reference's view of them.

    ``refs`` mirror the model's parameters (the first optimizer's, ``opt``), ``drefs``
    the discriminator's (``opt2``'s). Backward passes are numbered from 1; ``wrote``
    says which parameters each wrote (1: ``opt``'s, 2: ``opt2``'s), ``stepped`` which
    passes each optimizer's steps applied, as the window ends of its parameters then.
    """

    net: FuzzNet
    disc: torch.nn.Linear
    opt: torch.optim.Optimizer
    opt2: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    refs: list[Ref]
    drefs: list[Ref]
    batch: tuple[torch.Tensor, torch.Tensor]
    poisoned: bool = False  # a step of ``opt`` applied NaN: the model's weights are NaN
    poisoned2: bool = False  # ... of ``opt2``: the discriminator's
    passes: int = 0
    wrote: dict[int, set[int]] = dataclasses.field(default_factory=dict)
    # (optimizer, passes it surely applied, passes gradguard may take it to have, passes before)
    stepped: list[tuple[int, set[int], set[int], int]] = dataclasses.field(default_factory=list)

    def backward(self, net: list[int], disc: list[int], *, nan: bool, nan_disc: bool) -> None:
        """One backward pass writing the model's parameters ``net`` and the discriminator's."""
        self.passes += 1
        train = self.net.training
        for i in net:
            self.refs[i].backward(nan=nan, backward=self.passes, train=train)
        for i in disc:
            self.drefs[i].backward(nan=nan_disc, backward=self.passes, train=train)
        self.wrote[self.passes] = ({1} if net else set()) | ({2} if disc else set())

    def note_step(self, owner: int) -> None:
        """The optimizer ``owner`` is about to step: the passes it applies."""
        refs = self.refs if owner == 1 else self.drefs
        windowed = [r for r in refs if r.member and r.trainable and r.window]
        sure = {end for r in windowed if r.new for end in (r.window[0], r.window[-1])}
        maybe = {end for r in windowed for end in (r.window[0], r.window[-1])}
        self.stepped.append((owner, sure, maybe, self.passes))

    def foreign(self, owner: int) -> tuple[set[int], set[int], set[int]]:
        """GG106 at ``owner``'s step: the parameters it must report, may miss, may add."""
        refs = self.refs if owner == 1 else self.drefs
        other = 3 - owner
        must, may_miss, may_add = set(), set(), set()
        for i, r in enumerate(refs):
            if not (r.member and r.trainable and r.window) or r.unhooked:
                continue
            blind = r.unsure or (r.nan and r.moved) or r.unseen
            if not (r.new and r.has and r.content) and not blind:
                continue
            first, last = r.window[0], r.window[-1]
            later = any(other in self.wrote[b] for b in range(last, self.passes + 1))
            sure = maybe = r.modes == {True, False}
            if 0 < first < last and not later:
                sure = sure or any(
                    o == other and first in s and at < last for o, s, _, at in self.stepped
                )
                maybe = maybe or any(
                    o == other and first in m and at < last for o, _, m, at in self.stepped
                )
            if sure and not blind:
                must.add(i)
            if maybe or sure:
                may_add.add(i)
            if blind:
                may_miss.add(i)
        return must, may_miss, may_add


def apply(op: str, w: World) -> None:
    """Run ``op`` on the real models and mirror it in the reference."""
    net, opt, refs, batch, poisoned = w.net, w.opt, w.refs, w.batch, w.poisoned
    params = list(net.parameters())
    written = [i for i, r in enumerate(refs) if r.trainable and (r.member or i not in EXTRA)]
    hooking = ("backward", "backward_head", "scaler_skip", "opt_zero", "opt_zero_inplace")
    if op in (*hooking, "backward_through") or (op == "grow" and not net.grown):
        # gradguard hooks an unfrozen parameter at the next step, optimizer
        # clear, add_param_group (growing again adds none), or backward into
        # a parameter it hooked.
        for r in refs:
            r.unhooked = r.unhooked and not r.trainable
    if op == "backward":
        loss_of(net, batch).backward()
        w.backward(written, [], nan=poisoned, nan_disc=False)
    elif op == "backward_head":
        x, y = batch
        torch.nn.functional.mse_loss(net.head(net.encoder(x).detach()), y).backward()
        w.backward(list(HEAD), [], nan=poisoned, nan_disc=False)
    elif op in ("backward_through", "backward_disc"):
        # A GAN's generator loss through the discriminator, and the discriminator's own.
        out = net(batch[0])
        through = op == "backward_through"
        w.disc(out if through else out.detach()).pow(2).mean().backward()
        nan = poisoned or w.poisoned2
        w.backward(written if through else [], [0, 1], nan=nan, nan_disc=nan)
    elif op == "scaler_skip":
        # An AMP iteration whose loss overflowed: the scaler unscales the
        # gradients (to NaN), finds them non-finite and skips the step.
        w.scaler.scale(loss_of(net, batch) * float("inf")).backward()
        w.scaler.step(opt)
        w.scaler.update()
        w.backward(written, [], nan=True, nan_disc=False)
    elif op in ("opt_zero", "opt_zero_inplace"):
        opt.zero_grad(set_to_none=op == "opt_zero")
        for r in refs:
            if r.member:
                r.clear(to_none=op == "opt_zero", seen=True, watched=True)
    elif op == "opt2_zero":
        w.opt2.zero_grad()
        for r in w.drefs:
            r.clear(to_none=True, seen=True, watched=True)
    elif op in ("model_zero", "model_zero_inplace"):
        net.zero_grad(set_to_none=op == "model_zero")
        for r in refs:
            r.clear(to_none=op == "model_zero", seen=op == "model_zero")
    elif op == "head_zero":
        net.head.zero_grad()
        for i in HEAD:
            refs[i].clear(to_none=True, seen=True)
    elif op.startswith("grad_none_"):
        i = int(op.rsplit("_", 1)[1])
        params[i].grad = None
        refs[i].clear(to_none=True, seen=True)
    elif op == "clip":
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        nan = any(r.has and r.nan for r in refs)
        for r in refs:
            r.clip(nan=nan)
    elif op in ("write", "assign"):
        # Gradients computed by hand (torch.autograd.grad, per-sample
        # gradients), copied into .grad or assigned to it.
        trainable = [i for i, p in enumerate(params) if p.requires_grad and not refs[i].unhooked]
        outputs = torch.autograd.grad(
            loss_of(net, batch), [params[i] for i in trainable], allow_unused=True
        )
        for i, value in zip(trainable, outputs, strict=True):
            if value is None:
                continue  # not in the loss (the extra layer before it grows)
            if op == "write" and params[i].grad is not None:
                params[i].grad.copy_(value)
            else:
                params[i].grad = value
            in_place = op == "write" and refs[i].has
            refs[i].write(in_place=in_place, nan=poisoned)
    elif op == "grow" and not net.grown:
        opt.add_param_group({"params": list(net.extra.parameters())})
        net.grown = True
        for i in EXTRA:
            refs[i].join()
    elif op in ("freeze", "unfreeze"):
        net.encoder.requires_grad_(op == "unfreeze")
        for i in ENCODER:
            refs[i].trainable = op == "unfreeze"
    elif op in ("eval", "train"):
        net.train(op == "train")


Expected = dict[int, tuple]
"""Per step of one optimizer: what it must, may not, or may also report, and the context."""


def _check(expectations: Expected, fired: list[gradguard.Finding], names: list[str]) -> None:
    """Judged when its device results arrived (at once on the CPU, later under
    `device_results`), each finding names the step it is about."""
    for step, (must, may_miss, may_add, gg103, context) in expectations.items():
        got = {code: set() for code in ("GG101", "GG102", "GG103", "GG106")}
        for f in fired:
            if f.code in got and f.step == step:
                got[f.code] |= {names.index(p) for p in f.params} or {-1}
        for code in ("GG101", "GG102", "GG106"):
            assert must[code] - may_miss[code] <= got[code] <= must[code] | may_add[code], (
                code,
                step,
                context,
            )
        assert bool(got["GG103"]) == gg103 or (gg103 and may_miss["GG103"]), (
            "GG103",
            step,
            context,
        )


def _expect(w: World, owner: int, context: str) -> tuple:
    must, may_miss, may_add, gg103 = expected(w.refs if owner == 1 else w.drefs)
    must["GG106"], may_miss["GG106"], may_add["GG106"] = w.foreign(owner)
    return (must, may_miss, may_add, gg103, context)


def _step(w: World, owner: int) -> None:
    """Step optimizer ``owner``, and what it applied in the reference."""
    refs = w.refs if owner == 1 else w.drefs
    w.note_step(owner)
    (w.opt if owner == 1 else w.opt2).step()
    nan = any(r.member and r.has and r.nan for r in refs)
    if owner == 1:
        w.poisoned = w.poisoned or nan
    else:
        w.poisoned2 = w.poisoned2 or nan
    for r in refs:
        r.unhooked = r.unhooked and not r.trainable
        if r.member:
            r.step()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
@example(
    ops=["backward", "model_zero_inplace", "backward_head", "clip", "step", "step"],
    momentum=False,
    frozen=False,
)
@example(
    ops=["backward", "model_zero_inplace", "backward_head", "clip", "step", "clip", "step"],
    momentum=False,
    frozen=False,
)
@example(
    # A NaN from a skipped AMP step spread by clipping over a frozen, zeroed gradient.
    ops=[
        "backward",
        "step",
        "freeze",
        "backward",
        "model_zero_inplace",
        "scaler_skip",
        "clip",
        "step",
    ],
    momentum=False,
    frozen=False,
)
@example(
    # The GAN leak: the generator's backward, left in the discriminator's gradients.
    ops=["backward_through", "step", "opt_zero", "backward_disc", "step2"],
    momentum=False,
    frozen=False,
)
@example(
    # The validation leak: a backward in eval mode, then training's, then a step.
    ops=["eval", "backward", "train", "backward", "step"],
    momentum=False,
    frozen=False,
)
@given(
    ops=st.lists(OPS, min_size=1, max_size=24),
    momentum=st.booleans(),
    frozen=st.booleans(),
)
def test_random_sequences_match_the_reference(ops, momentum, frozen):
    """Per step, gradguard reports what the reference says, up to the documented blind spots."""
    torch.manual_seed(0)
    net = FuzzNet()
    disc = torch.nn.Linear(2, 1)
    if frozen:  # frozen before the optimizer exists: no hook until unfrozen
        net.encoder.requires_grad_(False)
    body = [p for n, p in net.named_parameters() if not n.startswith("extra.")]
    w = World(
        net=net,
        disc=disc,
        opt=torch.optim.SGD(body, lr=0.1, momentum=0.9 if momentum else 0.0),
        opt2=torch.optim.SGD(disc.parameters(), lr=0.1),
        scaler=torch.amp.GradScaler("cpu"),
        refs=[
            Ref(
                member=i not in EXTRA,
                trainable=not (frozen and i in ENCODER),
                unhooked=frozen and i in ENCODER,
            )
            for i in range(6)
        ],
        drefs=[Ref(), Ref()],
        batch=(torch.randn(8, 4), torch.randn(8, 2)),
    )
    names = [n for n, _ in net.named_parameters()]
    expectations: Expected = {}
    expectations2: Expected = {}
    with (
        gradguard.guarding(w.opt, model=net, mode="log", check_numerics=False) as g,
        gradguard.guarding(w.opt2, model=disc, mode="log", check_numerics=False) as g2,
        gradguard.testing.record(g) as fired,
        gradguard.testing.record(g2) as fired2,
    ):
        for n, op in enumerate(ops):
            context = f"ops={ops[: n + 1]} frozen={frozen} refs={w.refs} drefs={w.drefs}"
            if op == "step":
                expectations[len(expectations) + 1] = _expect(w, 1, context)
                _step(w, 1)
            elif op == "step2":
                expectations2[len(expectations2) + 1] = _expect(w, 2, context)
                _step(w, 2)
            else:
                apply(op, w)
    _check(expectations, fired, names)
    _check(expectations2, fired2, ["weight", "bias"])
