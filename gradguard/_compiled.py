"""Step hooks that ``torch.compile`` never traces, so a compiled step is still judged.

With ``step = torch.compile(optimizer.step)``, dynamo traces torch's
hook-calling step wrapper and every step hook it calls. Traced, gradguard's
bookkeeping (frames, weak references, host reads) breaks the graph a dozen
times, and what it does at trace time is not what would run at each step.

`untraced` keeps dynamo out of a hook. Dynamo never gets past its first line:
inlined into the traced wrapper, it breaks there inside the wrapper's loop over
the hooks, and dynamo runs that frame (which does no tensor work) as plain
Python, without counting a graph break; traced on its own, the frame is
skipped. Either way the hook runs as plain Python at every call of the
compiled step, before and after the optimizer's own compiled body, and
nothing it calls is traced. When no compiled function is running (no frame
callback is set: eager training, whatever is imported), the hook is called
directly.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from gradguard._process import keep

Hook = Callable[..., None]

# The hooks wrapped without dynamo seen by this process, built on first use:
# importing torch._dynamo costs more than a second, so gradguard never does.
_DISABLED: dict[Hook, Hook] = keep("untraced hooks", {}, cache=True)
_REASON = "gradguard's step hooks run outside the graph"


def _dynamo_imported() -> object:
    return "torch._dynamo" in sys.modules or None


# The frame callback a compiled function sets while it runs (None when none
# runs). Older torch has no getter: then any process that imported dynamo
# takes the slower path.
get_eval_frame_callback: Callable[[], object] = getattr(
    getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None),
    "get_eval_frame_callback",
    _dynamo_imported,
)


def untraced(hook: Hook) -> Hook:
    """``hook``, run as plain Python even when its caller is being compiled."""

    @functools.wraps(hook)
    def run(*args: Any) -> None:
        if torch.compiler.is_compiling():
            # Dynamo is tracing this line (or running code during a compile,
            # where skip_frame does nothing): give the frame back to eager.
            torch._dynamo.skip_frame(_REASON)
        if get_eval_frame_callback() is None:
            hook(*args)  # no compiled function is running: nothing would trace it
            return
        disabled = _DISABLED.get(hook)
        if disabled is None:  # built here: dynamo would compile a helper's frame
            disabled = torch.compiler.disable(hook, reason=_REASON)  # type: ignore[no-untyped-call]
            _DISABLED[hook] = disabled
        disabled(*args)

    return run


RUN_CODE = untraced(lambda: None).__code__
"""The code of `untraced`'s frame: a hook whose caller runs it was called directly."""


def hook_caller() -> FrameType:
    """The frame that called the running `untraced` hook (torch's step wrapper).

    A hook whose caller's code is `RUN_CODE` (called directly, the usual
    case) finds it as that frame's ``f_back``, without this walk.

    Raises:
        RuntimeError: no `untraced` hook is running in this thread.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code is not RUN_CODE:
        frame = frame.f_back
    if frame is None or frame.f_back is None:
        raise RuntimeError("hook_caller() called outside an untraced hook")
    return frame.f_back
