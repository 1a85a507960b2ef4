"""Model-level checks: which module a parameter lives in, and in which mode.

Models come from ``model=`` or are found once by scanning live objects, so the
runner gets the same checks without being told about the model.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from gradguard._compiled import untraced
from gradguard._naming import REGISTRATIONS, find_owner_modules, named_modules_in_main
from gradguard._tracker import REGISTRY


class ModelWatch:
    """The models owning an optimizer's parameters, and each parameter's owner module.

    Their mode in every backward pass is noted from the moment they are known
    (`Registry.watch_models`) until `close`.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        self._given = bool(models)
        self._models = REGISTRY.watch_models(models)
        self._owners: dict[int, weakref.ref[nn.Module]] = {}  # param id -> module holding it
        self._orphans: set[int] = set()  # param ids no known module holds
        self._confirmed: set[int] = set()

    def models(self, params: list[torch.Tensor]) -> list[nn.Module]:
        """The live models; found from ``params`` on first use when none was given."""
        if not self._given and not self._models and params:
            self._models = REGISTRY.watch_models(find_owner_modules(params)[:1])
        return [m for m in (r() for r in self._models) if m is not None]

    def close(self) -> None:
        """Stop noting the models' mode in backward passes; idempotent."""
        REGISTRY.unwatch_models(self._models)

    def in_eval(self, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``fresh`` parameters, when every one of them lives in a module in eval mode.

        The mode that matters is that of the module a parameter lives in, not
        of the outermost one: a task module wrapping the model and its loss
        (timm) stays in train mode while validation put the model in eval.
        One parameter in a module in train mode makes the step a training
        step, so BatchNorm layers kept in eval, or a backbone kept in eval
        for its statistics, inside a model that trains are not reported. The
        first owner in train mode ends the look, so a correct step costs one
        lookup.
        """
        out = []
        for p in fresh:
            module = self._owner(p, fresh)
            if module is None:
                continue  # lives in no module we know: no mode to judge
            if module.training:
                return []
            out.append(p)
        return out

    def _owner(self, param: torch.Tensor, fresh: list[torch.Tensor]) -> nn.Module | None:
        key = id(param)
        ref = self._owners.get(key)
        if ref is None and key not in self._orphans:
            # A parameter we have not placed: map every module's own parameters
            # once, and remember the ones none holds so as not to look again.
            self._owners = {
                id(p): weakref.ref(module)
                for model in self.models(fresh)
                for module in model.modules()
                for p in module.parameters(recurse=False)
            }
            self._orphans = {id(p) for p in fresh if id(p) not in self._owners}
            ref = self._owners.get(key)
        return None if ref is None else ref()

    def unoptimized(self, held: set[int]) -> list[torch.Tensor]:
        """Trainable model parameters holding a gradient that no optimizer in ``held`` owns.

        Candidates are confirmed against every live optimizer, guarded or not,
        so a second optimizer gradguard does not watch is no false alarm. The
        scan over live objects runs only for candidates not confirmed before.
        """
        candidates: list[torch.Tensor] = [
            p
            for m in self.models([])
            for p in m.parameters()
            if p.requires_grad and p.grad is not None and id(p) not in held
        ]
        if all(id(p) in self._confirmed for p in candidates):
            return candidates
        owned = {
            id(p)
            for obj in gc.get_objects()
            if issubclass(type(obj), torch.optim.Optimizer)
            for group in getattr(obj, "param_groups", [])
            for p in group["params"]
        }
        found: list[torch.Tensor] = [p for p in candidates if id(p) not in owned]
        self._confirmed = {id(p) for p in found}
        return found


class Sighting:
    """Modules outside the guarded models that take part in training, found once.

    GG302 looks at the models gradguard knows; a teacher or EMA copy left
    trainable, or a teacher's head applied as a raw weight, lives elsewhere.
    A sighting looks for them at a bounded cost, once per run:

    * while a session is on, every top-level module built since it started
      (`REGISTRATIONS`), by its class name;
    * the script's globals (``__main__``), and the attributes of objects held
      there (a trainer's ``teacher_model``), give modules by name;
    * from then on until the sighting closes, torch's global optimizer step
      pre-hook notes every optimizer that steps.

    A parameter of those modules that requires a gradient and got one, that no
    guard watches and that no optimizer seen stepping holds, is a candidate;
    it is reported once it still is one at the next check, so an optimizer
    that steps now and then is seen first.
    """

    def __init__(self) -> None:
        self.optimizers: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.candidates: list[tuple[weakref.ref[torch.Tensor], str]] = []
        self._step: RemovableHandle | None = register_optimizer_step_pre_hook(self._stepped)

    @untraced
    def _stepped(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        self.optimizers.add(optimizer)

    def look(self, known: list[nn.Module], held: set[int]) -> None:
        """Note the candidates: what got a gradient outside ``known`` and ``held``."""
        inside = {id(p) for m in known for p in m.parameters()}
        seen: set[int] = set()
        for name, root in _roots(REGISTRATIONS.top_level()):
            for path, p in root.named_parameters():
                key = id(p)
                if key in seen or key in inside or key in held:
                    continue
                seen.add(key)
                if p.requires_grad and p.grad is not None:
                    self.candidates.append((weakref.ref(p), f"{name}.{path}"))

    def confirm(self, held: set[int]) -> list[tuple[torch.Tensor, str]]:
        """The candidates that still get gradients that no optimizer holds; then close."""
        owned = {
            id(p) for opt in self.optimizers for group in opt.param_groups for p in group["params"]
        }
        out = []
        for ref, name in self.candidates:
            p = ref()
            if p is None or not p.requires_grad or p.grad is None:
                continue
            if id(p) not in owned and id(p) not in held:
                out.append((p, name))
        self.close()
        return out

    def close(self) -> None:
        """Remove the hook; idempotent."""
        if self._step is not None:
            self._step.remove()
            self._step = None
        self.candidates = []


def _roots(built: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """Named top-level modules: the script's, then those built that nothing holds.

    Names come from the script's globals (``teacher``, ``trainer.teacher_model``);
    a module only seen being built is named by its class.
    """
    named = named_modules_in_main()
    covered = {id(sub) for _, m in named for sub in m.modules()}
    named.extend((type(m).__name__, m) for m in built if id(m) not in covered)
    return named
