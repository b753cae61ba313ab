"""Stride-phase decomposition of a transposed convolution: integer planning only.

On one axis, full-output index ``o = i * stride + t * dilation`` receives input
``i`` through tap ``t``. Writing ``o = q * stride + p`` with phase
``0 <= p < stride``, the taps reaching phase ``p`` are those with
``t * dilation ≡ p (mod stride)`` and they read input ``q + r`` with the fixed
offset ``r = (p - t * dilation) / stride <= 0``. Each phase is therefore an
ordinary correlation of the input with a sub-kernel: no products with the
zeros a naive implementation inserts between input voxels.

In 3D a phase is a triple of axis phases. Phases whose axis offsets coincide
read the same input neighbourhoods and are computed by one GEMM whose columns
hold every such phase's filters (``kernel == stride`` gives a single group: one
GEMM for the whole layer).

Everything here depends on the layer only, except :class:`AxisGrid`, which
places one box on the phase grid. Keeping the groups and their matrix shapes
independent of the box (and, in the GEMM engine, each grid point's row
position within its GEMM: see :mod:`conv3dt.engine.gemm_engine`) is what
makes tiled results bit-identical to untiled ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

__all__ = [
    "AxisGrid",
    "AxisPhase",
    "PhaseGroup",
    "axis_grid",
    "axis_phases",
    "phase_groups",
]


@dataclass(frozen=True)
class AxisPhase:
    """One phase of one axis.

    Attributes
    ----------
    phase : int
        ``p``: the full-output indices ``q * stride + p`` belong to it.
    taps : tuple of int
        Kernel taps reaching the phase, ascending.
    offsets : tuple of int
        For each tap, the input offset ``r`` (input ``q + r`` feeds output ``q * stride + p``).
    """

    phase: int
    taps: tuple[int, ...]
    offsets: tuple[int, ...]


def axis_phases(kernel_size: int, stride: int, dilation: int) -> tuple[AxisPhase, ...]:
    """The phases of one axis that receive at least one tap, by ascending phase."""
    phases = []
    for p in range(stride):
        taps = tuple(t for t in range(kernel_size) if (t * dilation - p) % stride == 0)
        if taps:
            offsets = tuple((p - t * dilation) // stride for t in taps)
            phases.append(AxisPhase(p, taps, offsets))
    return tuple(phases)


@dataclass(frozen=True)
class PhaseGroup:
    """3D phases that share their input offsets, computed by one GEMM.

    Attributes
    ----------
    offsets : tuple of three tuples of int
        The axis offsets every phase of the group reads, in tap order. The GEMM's
        reduction runs over their product (depth-major), then over channels.
    phases : tuple of tuples
        Each entry is a triple of :class:`AxisPhase`; it owns ``filters``
        consecutive GEMM columns, in this order.
    """

    offsets: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    phases: tuple[tuple[AxisPhase, AxisPhase, AxisPhase], ...]

    @property
    def taps_per_phase(self) -> int:
        """Number of 3D taps each phase of the group sums."""
        return len(self.offsets[0]) * len(self.offsets[1]) * len(self.offsets[2])


def phase_groups(
    kernel_size: tuple[int, int, int],
    strides: tuple[int, int, int],
    dilation: tuple[int, int, int],
) -> tuple[PhaseGroup, ...]:
    """Group a layer's 3D phases by shared input offsets (first-seen order)."""
    per_axis = [axis_phases(kernel_size[a], strides[a], dilation[a]) for a in range(3)]
    groups: dict[tuple[tuple[int, ...], ...], list[tuple[AxisPhase, AxisPhase, AxisPhase]]] = {}
    for triple in product(*per_axis):
        key = tuple(ph.offsets for ph in triple)
        groups.setdefault(key, []).append(triple)
    return tuple(PhaseGroup(key, tuple(members)) for key, members in groups.items())  # type: ignore[arg-type]


@dataclass(frozen=True)
class AxisGrid:
    """One box on one axis, placed on the phase grid.

    Output ``q * stride + p`` of every phase is computed for ``q`` in
    ``[q_start, q_stop)``; outputs of a phase outside that phase's own
    ``[start, stop)`` are computed and dropped.

    Attributes
    ----------
    q_start, q_stop : int
        The common grid.
    phase_ranges : dict
        ``{phase: (start, stop)}``: the ``q`` whose output lies in the box and
        can receive input; empty phases are left out.
    covers_box : bool
        Whether every output of the box lies in some phase's range (else some
        outputs receive no input and are zero).
    """

    q_start: int
    q_stop: int
    phase_ranges: dict[int, tuple[int, int]]
    covers_box: bool


def axis_grid(
    phases: tuple[AxisPhase, ...],
    stride: int,
    in_origin: int,
    in_length: int,
    out_start: int,
    out_length: int,
) -> AxisGrid | None:
    """Place the full-output box ``[out_start, out_start + out_length)`` on the phase grid.

    Returns None when no output of the box can receive input.
    """
    ranges = {}
    for ph in phases:
        # q * stride + p inside the box ...
        lo = -((ph.phase - out_start) // stride)
        hi = -((ph.phase - out_start - out_length) // stride)
        # ... and q + r inside the input box for some tap.
        lo = max(lo, in_origin - max(ph.offsets))
        hi = min(hi, in_origin + in_length - min(ph.offsets))
        if hi > lo:
            ranges[ph.phase] = (lo, hi)
    if not ranges:
        return None
    q_start = min(lo for lo, _ in ranges.values())
    q_stop = max(hi for _, hi in ranges.values())
    # Each output index is one (phase, q): the ranges cover the box if their sizes add up.
    covered = sum(hi - lo for lo, hi in ranges.values()) == out_length
    return AxisGrid(q_start, q_stop, ranges, covered)
