"""Tolerances for tests that compare two code paths computing the same numbers, derived from rounding.

Two paths that compute the same mathematics in another order (a fused kernel and a per-tensor loop, compiled and
eager, a packed row and padded rows, the addmm LoRA forward and peft's, two processes and one) differ by rounding
alone, and how much is set by the dtype, the number of stages the error passes through and the size of the numbers,
not by the machine a test was first run on: torch runs AVX2 or AVX512 kernels (ATEN_CPU_CAPABILITY picks), whose
vector widths sum in other orders, and a tolerance read off one of them can fail on the other. The rule:

    |actual - expected| <= rtol * (|expected| + scale),   rtol = steps * (SUM_ROUNDINGS * eps(float32) + OUTPUT_ROUNDINGS * eps(dtype))

- eps = torch.finfo(dtype).eps, twice the relative error of one rounding to nearest.
- A step is one stage the error passes through: the embedding with the head and the loss, a decoder layer's forward,
  the same again backward, one optimizer update. Within a step, sums run in float32 (the accumulator of every CPU
  kernel, bf16 autocast's GEMMs included): K terms summed in two blocked orders differ by about sqrt(K) roundings of
  the terms' size each. The test models reduce over at most ~1000 terms (hidden 64, intermediate 128, a vocabulary
  of ~700, some dozens of tokens), hence SUM_ROUNDINGS = 2 * sqrt(1024). The stage's results are then rounded to
  dtype, once per op, a few ops in a row: OUTPUT_ROUNDINGS of eps(dtype), which for bf16 outweighs the sums.
- Steps compound additively to first order (each passes on the relative error it got and adds its own).
- scale: a sum's error is relative to its terms, not to its result, so an entry that cancels to near zero keeps the
  absolute error of the larger ones; atol = rtol * scale, with scale the magnitude of the compared tensor (its
  largest entry) unless a test knows better.

Training runs compare their weights in units of the learning rate, the most a step of AdamW moves an entry
(assert_same_updates), with one exception no rounding rule bounds: AdamW divides each entry's step by that entry's
own gradient size, so where a gradient sits within rounding of zero a rounding-sized difference changes the step
outright. A few such entries per tensor are allowed; a wrong step moves nearly all of them.
"""

from __future__ import annotations

import math

import pytest
import torch

SUM_ROUNDINGS = 2 * math.sqrt(1024)  # two orders of a <=1024-term float32 sum, ~sqrt(K) roundings each
OUTPUT_ROUNDINGS = 4  # a stage's ops each round their result to the compute dtype once


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def forward_steps(layers: int, *, backward: bool = False) -> int:
    """Stages of a decoder's pass: each layer, plus the embedding with the head and loss; twice with the backward."""
    return (layers + 1) * (2 if backward else 1)


def relative_tolerance(dtype: torch.dtype = torch.float32, *, steps: int = 1) -> float:
    return steps * (SUM_ROUNDINGS * eps(torch.float32) + OUTPUT_ROUNDINGS * eps(dtype))


def float_tolerance(dtype: torch.dtype = torch.float32, *, steps: int = 1, scale: float = 1.0) -> dict[str, float]:
    """``rtol`` and ``atol`` for torch.testing.assert_close, for values computed through ``steps`` stages in ``dtype``."""
    rtol = relative_tolerance(dtype, steps=steps)
    return {"rtol": rtol, "atol": rtol * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, dtype: torch.dtype | None = None,
                 scale: float | None = None, msg: str | None = None) -> None:
    """torch.testing.assert_close within the rounding of ``steps`` stages in ``dtype`` (the tensors' own by
    default), ``scale`` being ``expected``'s largest entry unless given."""
    dtype = dtype or (expected.dtype if expected.is_floating_point() else torch.float32)
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, **float_tolerance(dtype, steps=steps, scale=scale), msg=msg)


def approx(expected, *, steps: int, dtype: torch.dtype = torch.float32, scale: float | None = None):
    """pytest.approx for Python floats (a loss, a list of losses) computed through ``steps`` stages in ``dtype``."""
    values = expected if isinstance(expected, (list, tuple)) else expected.values() if isinstance(expected, dict) else [expected]
    rtol = relative_tolerance(dtype, steps=steps)
    scale = max(abs(v) for v in values) if scale is None else scale
    return pytest.approx(expected, rel=rtol, abs=rtol * scale)


# How many of a tensor's entries may take an AdamW step off by more than rounding. An entry is at risk where its
# gradient lies within the gradients' rounding of zero (~1e-5 of the tensor's largest gradient): few entries, unless
# gradients bunch near zero. Measured: 6 of the tiny Llama's ~120k entries (packed against padded), at most 2 in one
# tensor, and 1 in a 256-entry lora_A (FSDP against one process). Allowed: a thousandth of the tensor, plus two, as
# the few land in tensors by chance and a small tensor can catch more than its share.
OUTLIER_SHARE, OUTLIER_SLACK = 1e-3, 2


def assert_same_updates(trained: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, lrs: list[float], steps: int) -> None:
    """Two float32 AdamW runs from the same weights, with learning rates ``lrs`` step by step, reached the same
    weights to rounding, entry by entry.

    A step moves an entry by lr * m/sqrt(v), at most lr for the first few steps. The two runs' m/sqrt(v) differ by
    the rounding of the ``steps`` stages behind them (each optimizer step's forward, backward and update), so their
    steps differ by rtol(steps) * lr, and over the run by rtol(steps) * sum(lrs); storing the weight in float32 after
    each step adds up to an ulp where two updates a rounding apart round to neighbouring floats (eps * |w| a step).

    Except where a gradient sits within rounding of zero: AdamW divides each entry's step by that entry's own gradient
    size, so a rounding-sized difference there can change the step's size or turn it around, by up to 2 lr. Such
    entries are few: at most OUTLIER_SHARE of a tensor, plus OUTLIER_SLACK entries, may be off by more than rounding,
    none by more than 2 * sum(lrs). A step skipped or taken with another learning rate, or a tensor left out, moves nearly
    every entry by about lr and fails.
    """
    assert trained.keys() == reference.keys()
    rtol, travel = relative_tolerance(torch.float32, steps=steps), sum(lrs)
    for name, tensor in reference.items():
        expected = tensor.double()
        off = (trained[name].double() - expected).abs()
        tolerance = rtol * travel + len(lrs) * eps(torch.float32) * expected.abs()
        outliers, allowed = int((off > tolerance).sum()), math.ceil(OUTLIER_SHARE * off.numel()) + OUTLIER_SLACK
        assert outliers <= allowed and off.max().item() <= 2 * travel, (
            f"{name}: {outliers} of {off.numel()} entries (at most {allowed}) off by more than {rtol * travel:.3g} + "
            f"{len(lrs)} float32 ulps; the largest by {off.max().item():.3g}")


# The frozen base held in bf16 under bf16 autocast (ftune.training.base_dtype) against a float32 base under the same
# autocast. Autocast casts a float32 linear weight to bf16 with the same round-to-nearest-even as the one-time cast,
# so every matmul gets bit-identical weights, and norms run in float32 with the same float32 weights. What differs is
# the embedding: its lookup returns bf16-rounded values (turned back to float32), a relative change of at most
# eps(bf16) / 2 in the residual stream's first term. From there the perturbation travels through the model: each
# stage passes it on (first order, relative, as assert_close's steps do) and may add one eps(bf16) where a perturbed
# value crosses a bf16 rounding boundary of an op that rounds to bf16 (the next matmul's input cast), so after
# ``steps`` stages it is at most steps * eps(bf16), relative to the compared tensor's scale. No float32 summation
# order changes (the same kernels run on the same shapes), so the SUM_ROUNDINGS term does not enter.
def bf16_base_tolerance(*, layers: int, backward: bool = False, scale: float) -> dict[str, float]:
    """rel/abs (rtol/atol) for a loss or gradient of a bf16-held base against a float32 base, both under bf16 autocast."""
    rtol = forward_steps(layers, backward=backward) * eps(torch.bfloat16)
    return {"rtol": rtol, "atol": rtol * scale}


def bf16_base_training_tolerance(*, layers: int, loss: float, lr: float, steps: int, gradient_l1: float) -> float:
    """Absolute tolerance for the loss after ``steps`` AdamW steps of the adapters over a bf16-held base against a
    float32 base (both under bf16 autocast). The forward at equal weights differs by bf16_base_tolerance; the weights
    themselves drift apart by at most the two runs' update sizes: an early AdamW step moves an entry by at most lr
    (m / sqrt(v) <= 1 while the moments are young), so after ``steps`` steps an entry is at most 2 * lr * steps
    apart, which moves the loss by at most that times the L1 norm of its gradient (first order, the gradient summed
    over the trained entries, ``gradient_l1``)."""
    return bf16_base_tolerance(layers=layers, scale=abs(loss))["atol"] + 2 * lr * steps * gradient_l1
