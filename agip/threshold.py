"""Exact k-th smallest selection by radix select on the float bits (docs/algorithm.md §2.3).

Non-negative fp32 values (+0 through +inf) order exactly like their bit patterns read
as unsigned integers, so the k-th smallest value can be found digit by digit: count the
values per top digit (a histogram), find the bin that holds the k-th, then count only
the values inside that bin by the next digit, and so on. Two 16-bit digits resolve all
32 bits: the fused backends get the first histogram from their stats pass (pass A) and
the second from one refine pass (pass B), and this module does the tiny host-side part.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

DIGITS = (16, 16)


def bits_to_float(bits: int) -> float:
    """The fp32 value whose bit pattern is ``bits`` (0 <= bits < 2**32)."""
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def radix_select(k: int, histogram: Callable[[int, int, int], torch.Tensor], digits: Sequence[int] = DIGITS) -> float:
    """The exact k-th smallest (1-based) of a set of non-negative fp32 values.

    ``histogram(prefix, prefix_bits, digit_bits)`` must return the counts (length
    ``2**digit_bits``) of the values whose top ``prefix_bits`` bits equal ``prefix``,
    binned by their next ``digit_bits`` bits. ``digits`` must add up to 32.
    """
    return radix_select_count(k, histogram, digits)[0]


def radix_select_count(k: int, histogram: Callable[[int, int, int], torch.Tensor], digits: Sequence[int] = DIGITS):
    """:func:`radix_select`, also returning how many values are <= the result."""
    if sum(digits) != 32:
        raise ValueError(f"digits must add up to 32 bits, got {tuple(digits)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    prefix, done, below = 0, 0, 0
    for nb in digits:
        counts = histogram(prefix, done, nb).to(torch.int64).cpu()
        cum = torch.cumsum(counts, 0)
        if int(cum[-1]) < k:
            raise ValueError(f"k={k} but only {int(cum[-1])} values lie in the selected range")
        d = int(torch.searchsorted(cum, torch.tensor([k]), side="left")[0])  # first bin with cum >= k
        if d > 0:
            k -= int(cum[d - 1])
            below += int(cum[d - 1])
        prefix = (prefix << nb) | d
        done += nb
    return bits_to_float(prefix), below + int(counts[d])


def torch_histogram(values: torch.Tensor) -> Callable[[int, int, int], torch.Tensor]:
    """A ``histogram`` callable for :func:`radix_select` over a plain fp32 tensor.

    Used to test the algorithm and by backends whose kernels produce the same counts.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"values must be float32, got {values.dtype}")
    bits = values.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    def histogram(prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
        sel = bits if prefix_bits == 0 else bits[(bits >> (32 - prefix_bits)) == prefix]
        digit = (sel >> (32 - prefix_bits - digit_bits)) & ((1 << digit_bits) - 1)
        return torch.bincount(digit, minlength=1 << digit_bits)

    return histogram
