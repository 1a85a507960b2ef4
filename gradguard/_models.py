"""Model-level checks: which module a parameter lives in, and in which mode.

Models come from ``model=`` or are found once by scanning live objects, so the
runner gets the same checks without being told about the model.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from gradguard._naming import find_owner_modules


class ModelWatch:
    """The models owning an optimizer's parameters, and each parameter's owner module."""

    def __init__(self, models: list[nn.Module]) -> None:
        self._given = bool(models)
        self._models = [weakref.ref(m) for m in models]
        self._owners: dict[int, weakref.ref[nn.Module]] = {}  # param id -> module holding it
        self._orphans: set[int] = set()  # param ids no known module holds
        self._confirmed: set[int] = set()

    def models(self, params: list[torch.Tensor]) -> list[nn.Module]:
        """The live models; found from ``params`` on first use when none was given."""
        if not self._given and not self._models and params:
            self._models = [weakref.ref(m) for m in find_owner_modules(params)[:1]]
        return [m for m in (r() for r in self._models) if m is not None]

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
