"""GG401 rank-divergence: comparing fingerprints, and the check outside a process group.

The 2-process runs (FunASR's and nanoGPT's no_sync bugs, the correct twin,
strict mode) are in ``test_ddp.py``, which shares one pair of processes.
"""

from __future__ import annotations

import pytest
import torch

import gradguard
from gradguard._ranks import BUCKETS, HEADER, SIZE, bucket_of, compare


def rows(*fingerprints: list[float]) -> list[float]:
    """Concatenate per-rank fingerprints as all_gather returns them."""
    return [v for fp in fingerprints for v in fp]


def fp(step: int, squares: list[float], missing: int = 0) -> list[float]:
    """A fingerprint with one bucket per parameter."""
    return [step, len(squares), missing, *squares, *[0.0] * (BUCKETS - len(squares))]


def test_compare_is_silent_on_identical_and_nearly_identical_ranks():
    """Equal fingerprints, or within the relative tolerance, are no divergence."""
    a = fp(4, [1.0, 2.0, 3.0])
    b = fp(4, [1.0, 2.0 * (1 + 1e-6), 3.0])
    assert compare(rows(a, b, a), 3) is None


def test_compare_names_the_odd_rank_and_the_parameters_that_differ_most():
    """With 3 ranks the majority is the reference; the largest gaps come first."""
    a = fp(4, [1.0, 2.0, 3.0])
    odd = fp(4, [1.0, 2.5, 9.0])
    found = compare(rows(a, odd, a), 3)
    assert found is not None
    assert found.params == [2, 1]
    assert found.detail.startswith("rank 1 differs from ranks 0, 2")


def test_compare_reports_ranks_that_disagree_on_missing_gradients():
    """One rank with a gradient where the other has none is a divergence."""
    found = compare(rows(fp(2, [1.0, 0.0], missing=1), fp(2, [1.0, 0.0], missing=0)), 2)
    assert found is not None
    assert "which parameters have a gradient" in found.detail


def test_compare_treats_nan_on_every_rank_as_agreement():
    """The same NaN gradient on every rank is GG201's business, not a divergence."""
    nan = float("nan")
    assert compare(rows(fp(1, [nan, 1.0]), fp(1, [nan, 1.0])), 2) is None


def test_large_models_share_buckets_of_consecutive_parameters():
    """Beyond 64 parameters each bucket holds a run of consecutive ones."""
    assert SIZE == HEADER + BUCKETS
    owners = [bucket_of(i, 640) for i in range(640)]
    assert owners == sorted(owners)
    assert set(owners) == set(range(BUCKETS))


def test_without_a_process_group_the_check_is_a_no_op():
    """check_ranks_every in a single process runs no collective and reports nothing."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.guarding(opt, mode="strict", check_ranks_every=1) as g:
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
    assert g.findings == []


@pytest.mark.parametrize("bad", [0, -2, 1.5, "3"])
def test_check_ranks_every_is_validated_at_the_call(bad):
    """A non-positive or non-int check_ranks_every is rejected where it is passed."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises((TypeError, ValueError), match="check_ranks_every"):
        gradguard.guard(opt, check_ranks_every=bad)
