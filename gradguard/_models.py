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

# parameter id -> (the module holding it, the model that module belongs to)
_Owners = dict[int, tuple["weakref.ref[nn.Module]", "weakref.ref[nn.Module]"]]


def _dead() -> None:
    return None


class ModelWatch:
    """The models owning an optimizer's parameters, and each parameter's owner module."""

    def __init__(self, models: list[nn.Module]) -> None:
        self._given = bool(models)
        self._models = [weakref.ref(m) for m in models]
        self._owners: _Owners = {}
        self._confirmed: set[int] = set()

    def models(self, params: list[torch.Tensor]) -> list[nn.Module]:
        """The live models; found from ``params`` on first use when none was given."""
        if not self._given and not self._models and params:
            self._models = [weakref.ref(m) for m in find_owner_modules(params)[:1]]
        return [m for m in (r() for r in self._models) if m is not None]

    def in_eval(self, fresh: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``fresh`` parameters trained while their model and owner module are in eval.

        A frozen backbone or BatchNorm layers kept in eval inside a model in
        train mode are deliberate; a whole model left in eval after
        validation is the bug.
        """
        models = self.models(fresh)
        if not fresh or all(m.training for m in models):
            return []
        owners = self._owner_map(models, fresh)
        out = []
        for p in fresh:
            module, model = (r() for r in owners.get(id(p), (_dead, _dead)))
            if module is not None and model is not None and not (module.training or model.training):
                out.append(p)
        return out

    def _owner_map(self, models: list[nn.Module], fresh: list[torch.Tensor]) -> _Owners:
        # Built once and rebuilt only when a parameter it does not know shows up.
        if any(id(p) not in self._owners for p in fresh):
            self._owners = {}
            for model in models:
                for module in model.modules():
                    for p in module.parameters(recurse=False):
                        self._owners.setdefault(id(p), (weakref.ref(module), weakref.ref(model)))
        return self._owners

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
