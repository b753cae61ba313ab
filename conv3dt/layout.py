"""How an array on disk maps onto the layer's (batch, depth, height, width, channels).

Axis labels: ``b`` batch, ``z``/``y``/``x`` the three spatial axes in storage
order, ``c`` channels. The rules:

- 3D: one single-channel volume, ``zyx``.
- 4D: one volume with a channel axis where ``data_format`` puts it
  (``zyxc`` or ``czyx``); NIfTI always stores spatial axes first (``zyxc``),
  and with ``four_d_as_batch`` its 4th dimension is a batch of single-channel
  volumes (``zyxb``).
- 5D: a batch, ``bzyxc`` or ``bczyx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DiskLayout", "LayoutError", "disk_layout"]

_SPATIAL = ("z", "y", "x")
_CANONICAL = ("b", "z", "y", "x", "c")


class LayoutError(ValueError):
    """The array's rank or channel count does not fit the layer."""


@dataclass(frozen=True)
class DiskLayout:
    """The axis labels of an array on disk and the sizes they imply.

    Attributes
    ----------
    axes : str
        One label per stored axis, e.g. ``"zyxc"``.
    shape : tuple of int
        The stored shape.
    """

    axes: str
    shape: tuple[int, ...]

    def size(self, label: str) -> int:
        """Length of the axis with this label (1 when the axis is absent)."""
        return self.shape[self.axes.index(label)] if label in self.axes else 1

    @property
    def batch(self) -> int:
        """Number of volumes."""
        return self.size("b")

    @property
    def channels(self) -> int:
        """Channels per volume."""
        return self.size("c")

    @property
    def spatial(self) -> tuple[int, int, int]:
        """The three spatial lengths in storage order."""
        return (self.size("z"), self.size("y"), self.size("x"))

    def box(self, sample: int, start: tuple[int, ...], stop: tuple[int, ...]) -> tuple[slice, ...]:
        """Stored-array slices selecting one sample's spatial box (all channels)."""
        slices = []
        for label in self.axes:
            if label == "b":
                slices.append(slice(sample, sample + 1))
            elif label == "c":
                slices.append(slice(None))
            else:
                axis = _SPATIAL.index(label)
                slices.append(slice(start[axis], stop[axis]))
        return tuple(slices)

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """Turn a stored-layout box into ``(1, z, y, x, c)``."""
        order = [self.axes.index(label) for label in _CANONICAL if label in self.axes]
        moved = np.transpose(array, order)
        shape = [
            moved.shape[order.index(self.axes.index(label))] if label in self.axes else 1
            for label in _CANONICAL
        ]
        return moved.reshape(shape)

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """Turn ``(1, z, y, x, c)`` into this layout's axis order (absent axes dropped)."""
        present = [label for label in _CANONICAL if label in self.axes]
        squeezed = array.reshape([array.shape[_CANONICAL.index(label)] for label in present])
        return np.transpose(squeezed, [present.index(label) for label in self.axes])

    def with_sizes(
        self, spatial: tuple[int, int, int], channels: int, *, channels_first: bool = False
    ) -> DiskLayout:
        """The same layout with new spatial lengths and channel count.

        A layout without a channel axis gains one when ``channels`` is not 1:
        first (after any batch axis) when ``channels_first``, else last.

        Raises
        ------
        LayoutError
            When a NIfTI batch of volumes (``zyxb``) would need a channel axis too.
        """
        axes = self.axes
        if "c" not in axes and channels != 1:
            if axes == "zyxb":
                raise LayoutError(
                    f"a 4D series processed as a batch needs a 1-filter layer; this one has "
                    f"{channels} filters"
                )
            if channels_first:
                at = 1 if axes.startswith("b") else 0
                axes = axes[:at] + "c" + axes[at:]
            else:
                axes = axes + "c"
        shape = []
        for label in axes:
            if label == "c":
                shape.append(channels)
            elif label == "b":
                shape.append(self.batch)
            else:
                shape.append(spatial[_SPATIAL.index(label)])
        return DiskLayout(axes, tuple(shape))


def disk_layout(
    shape: tuple[int, ...],
    data_format: str,
    *,
    spatial_first: bool = False,
    four_d_as_batch: bool = False,
) -> DiskLayout:
    """Decide the axis labels of a stored array.

    Parameters
    ----------
    shape : tuple of int
        The stored shape.
    data_format : {"channels_last", "channels_first"}
        The layer's data format, which places the channel axis of .npy and HDF5 arrays.
    spatial_first : bool
        True for NIfTI, whose spatial axes always come first.
    four_d_as_batch : bool
        Treat a NIfTI 4th dimension as a batch of single-channel volumes.

    Raises
    ------
    LayoutError
        For ranks other than 3, 4 and 5.
    """
    rank = len(shape)
    if rank == 3:
        axes = "zyx"
    elif rank == 4:
        if spatial_first:
            axes = "zyxb" if four_d_as_batch else "zyxc"
        elif four_d_as_batch:
            axes = "bzyx"
        else:
            axes = "zyxc" if data_format == "channels_last" else "czyx"
    elif rank == 5:
        if spatial_first:
            raise LayoutError(
                f"a 5D NIfTI volume {shape} is not supported; expected 3D (i, j, k) or "
                "4D (i, j, k, channels)"
            )
        axes = "bzyxc" if data_format == "channels_last" else "bczyx"
    else:
        raise LayoutError(
            f"expected a 3D volume, a 4D volume with channels or a 5D batch; got {rank}D "
            f"shape {shape}"
        )
    if 0 in shape:
        raise LayoutError(f"the volume is empty (shape {shape})")
    return DiskLayout(axes, tuple(int(v) for v in shape))
