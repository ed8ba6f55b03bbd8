"""Greedy tokens from a vocabulary-wide fp32 LM head at about the cost of a bf16 matmul.

A decode step of a small model on the CPU is mostly its head: ``[rows, hidden] @
[hidden, vocab]`` in fp32 for every new token, of which greedy decoding keeps one
argmax per row. ``Screen`` computes the head in bf16 (half the time or less where the
CPU multiplies bf16 natively), bounds how far each bf16 logit can lie from the fp32
one, and computes in fp32 only the columns whose bound reaches the row's best bf16
logit: the argmax of those is the fp32 argmax, bar the last bits any two fp32 matmul
kernels differ by (the same as ``transformers``' own head against ours).

The bound, for a row ``x`` and a column ``w`` of the head, with ``x~ = bf16(x)``,
``r = x - x~``, ``w~ = bf16(w)``, ``R = w - w~`` (all exact in fp32):
``x.w - x~.w~ = x~.R + r.w``, at most ``|x~||R| + |r||w|`` (Cauchy-Schwarz); the bf16
product sums in fp32 and the fp32 reference too, each at most ``g_K |x||w|`` off (any
summation order of ``K`` terms, ``g_K = K u / (1 - K u)``); and rounding the bf16
result moves it by at most ``2^-8 (1 + 2^-7) |a|``. ``e`` takes each term at its
largest over the row's columns, with a margin. The fp32 argmax ``j*`` then has
``a[j*] >= max(a) - 2e``: the candidates. The norms sum their squares in float64: in
fp32 the square of a value below 1e-19 underflows to zero (a head scaled that small
would lose the rounding term) and one above 1e19 overflows. The CPU's bf16 kernel
treats subnormal inputs as zero, which the model above does not know of: both bf16
operands have theirs zeroed first, so that ``r`` and ``R`` account for them.

It must also be faster, which depends on the CPU: the first calls of each ``Screen``
run both ways on their real rows, check that the screen gives the fp32 tokens, and
time both; the screen stays only where it took at most 0.9 of the fp32 time (the
median of the calls' own ratios; a CPU without bf16 dot products takes several times
longer in bf16). Its bf16 copy of the weight (half the fp32 bytes again) is made by
``prepare`` (a serving stage calls it when it is built) or on first use, and again
when the weight changes.
"""

from __future__ import annotations

import logging
import statistics
import time
import weakref

import numpy as np
import torch

from ._rows import row_argmax

log = logging.getLogger("shardline.models")

__all__ = ["Screen"]

_TRIALS = 5          # calls that run both ways before the screen is kept or dropped
_FASTER = 0.9        # the screen's share of the fp32 time at most, to be kept
_MARGIN = 1.25      # on the bound, for kernels a little worse than the model of them
_WIDEST = 1 / 16     # candidate columns beyond this share of the vocabulary: fp32 instead
_NORMAL = 2.0 ** -126  # the least normal fp32 (and bf16) magnitude
_LARGEST = 2.0 ** 127  # a little below the largest fp32 (and bf16)
_SLICE = 1024        # columns of the weight at a time, for its float64 norms


class Screen:
    """The greedy tokens of ``x @ weight_t`` (``weight_t``: ``[hidden, vocab]`` fp32 on
    the CPU, the head's weight as it multiplies), for batches of at least
    ``min_rows`` rows (below that the bf16 matmul is no faster)."""

    def __init__(self, min_rows: int = 4) -> None:
        self.min_rows = min_rows
        self.enabled: bool | None = None  # None: still on trial
        self._times: tuple[list[float], list[float]] = ([], [])
        self._key: tuple[int, int, tuple[int, ...]] | None = None
        self._owner: weakref.ref[object] | None = None
        self._bf16 = torch.empty(0, dtype=torch.bfloat16)
        self._r_max = self._w_max = self._wb_max = 0.0

    def tokens(self, x: torch.Tensor, weight_t: torch.Tensor,
               owner: object | None = None) -> torch.Tensor | None:
        """Each row's argmax of ``x @ weight_t`` (``[rows]`` int64), or ``None`` where
        the caller had better compute the fp32 logits itself. ``owner``: the parameter
        ``weight_t`` is a view of (``prepare``)."""
        if self.enabled is False or x.shape[0] < self.min_rows or \
                x.device.type != "cpu" or x.dtype != torch.float32 or \
                weight_t.dtype != torch.float32 or weight_t.device.type != "cpu":
            return None
        # what follows reads the tensors as numpy arrays, which refuses a part of a graph
        x, weight_t = x.detach(), weight_t.detach()
        self.prepare(weight_t, owner)
        if self.enabled:
            return self._screened(x, weight_t)
        t0 = time.perf_counter()
        exact = row_argmax(torch.mm(x, weight_t))
        t1 = time.perf_counter()
        screened = self._screened(x, weight_t)
        t2 = time.perf_counter()
        if screened is not None and not torch.equal(screened, exact):
            self.enabled = False  # this CPU's bf16 kernel is not what the bound assumes
            return exact
        fp32, bf16 = self._times
        fp32.append(t1 - t0)
        bf16.append(t2 - t1)
        if len(fp32) >= _TRIALS:  # >=: two threads may both have added theirs
            # each call's own ratio: both ways ran on the same rows, one after the other
            share = statistics.median(b / f for f, b in zip(fp32, bf16, strict=False))
            self.enabled = share <= _FASTER
            log.debug("greedy screen %s: %.2f of the fp32 head's time (%d columns)",
                      "kept" if self.enabled else "dropped", share, weight_t.shape[1])
        return exact

    def prepare(self, weight_t: torch.Tensor, owner: object | None = None) -> None:
        """Make the bf16 copy of ``weight_t`` and its column norms, unless they are of
        this very weight already: the same ``owner`` object (a parameter replaced by
        another may get the freed memory of the first), the same memory, and no
        in-place change since. Writes through ``.data`` bump no version, so they go
        unseen (as by autograd); so do those to an inference tensor, which keeps no
        version (weights made as such are not trained)."""
        key = (weight_t.data_ptr(), -1 if weight_t.is_inference() else weight_t._version,
               (*weight_t.shape, *weight_t.stride()))
        same_owner = (self._owner() if self._owner is not None else None) is owner
        if key == self._key and same_owner:
            return
        r_max, w_max = [0.0], [0.0]
        with torch.no_grad():
            bf16 = weight_t.to(torch.bfloat16)
            for start in range(0, weight_t.shape[1], _SLICE):
                w, wb = weight_t[:, start:start + _SLICE], bf16[:, start:start + _SLICE]
                _flush_subnormals(wb)
                r_max.append(_norms(wb.float().sub_(w), 0).max())
                w_max.append(_norms(w, 0).max())
        # np.max keeps a NaN (a weight's), where max() would drop it
        self._r_max, self._w_max = float(np.max(r_max)), float(np.max(w_max))
        self._wb_max = self._w_max + self._r_max  # |bf16(w)| <= |w| + |w - bf16(w)|
        self._bf16, self._key = bf16, key
        self._owner = weakref.ref(owner) if owner is not None else None

    def _screened(self, x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor | None:
        xb = _flush_subnormals(x.to(torch.bfloat16))
        x_norm = _norms(x, 1)
        xb_norm = _norms(xb.float(), 1)
        r_norm = _norms(x - xb.float(), 1)
        # |x||w| bounds every partial sum of x.w (Cauchy-Schwarz): below fp32's max, no
        # summation order of either matmul overflows on the way
        if not ((x_norm * self._w_max < _LARGEST) & (xb_norm * self._wb_max < _LARGEST)).all():
            return None
        a = torch.mm(xb, self._bf16).float().numpy()
        top = a.max(1)
        biggest = np.maximum(top, -a.min(1))
        if not np.isfinite(biggest).all():
            return None
        k = x.shape[1] * 2.0 ** -24
        g = k / (1 - k)
        e = _MARGIN * (xb_norm * self._r_max + r_norm * self._w_max
                       + 2.0 ** -8 * (1 + 2.0 ** -7) * biggest
                       + g * (xb_norm * self._wb_max + x_norm * self._w_max) + 1e-30)
        if not np.isfinite(e).all():  # a weight with an inf or a NaN, or near fp32's max
            return None
        candidate = a >= (top - 2 * e)[:, None]
        tokens = a.argmax(1)
        if np.count_nonzero(candidate) == a.shape[0]:  # one each: the bf16 argmax
            return torch.from_numpy(tokens)
        rows, columns = np.divmod(np.flatnonzero(candidate), a.shape[1])  # by row
        several = np.flatnonzero(np.bincount(rows, minlength=a.shape[0]) > 1)
        kept = np.isin(rows, several)
        union, where = np.unique(columns[kept], return_inverse=True)
        if len(union) > _WIDEST * a.shape[1]:
            return None
        exact = torch.mm(x[torch.from_numpy(several)],
                         _columns(weight_t, torch.from_numpy(union))).numpy()
        only = np.full(exact.shape, -np.inf, dtype=exact.dtype)
        mine = np.searchsorted(several, rows[kept])
        only[mine, where] = exact[mine, where]
        # ascending columns: the first of equal maxima, as an argmax over all of them
        tokens[several] = union[only.argmax(1)]
        return torch.from_numpy(tokens)


def _norms(m: torch.Tensor, dim: int) -> np.ndarray:
    """The Euclidean norms of ``m`` along ``dim``, summed in float64."""
    norms: np.ndarray = torch.linalg.vector_norm(m, dim=dim, dtype=torch.float64).numpy()
    return norms


def _columns(weight_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``weight_t[:, index]``. Of a column-major ``weight_t`` (a head whose weight is
    also the embedding's, row-major), gathered as rows of its transpose: torch's
    ``index_select`` along a dim of stride 1 copies an element at a time, 0.25 s for
    300 columns of a 2048-wide head against 0.7 ms as rows."""
    if weight_t.stride(0) == 1 and weight_t.shape[0] > 1:
        return weight_t.t().index_select(0, index).t()
    return weight_t.index_select(1, index)


def _flush_subnormals(m: torch.Tensor) -> torch.Tensor:
    """``m`` (bf16, in place) with its subnormals zeroed, as the bf16 kernel reads them."""
    return m.masked_fill_(m.abs() < _NORMAL, 0)
