"""Per-axis integer arithmetic of a transposed convolution.

Everything here is plain integers: no arrays. The transposed convolution of an
input of length ``n`` on one axis first forms the *full* output of length
``(n - 1) * stride + k_eff`` (``k_eff`` is the dilated kernel size), where input
index ``i`` and kernel tap ``t`` land on full index ``i * stride + t * dilation``.
Keras then keeps the window ``[crop_left, full_length - crop_right)`` of it; a
negative crop means zeros are added on that side instead.

The padding arithmetic follows Keras's JAX conversion
(``_convert_conv_transpose_padding_args_from_keras_to_jax``) and its output
length follows ``compute_conv_transpose_output_shape``; TensorFlow, JAX and
Keras 3's torch backend agree on both.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AxisGeometry",
    "axis_geometry",
    "effective_kernel_size",
    "input_range_for_output",
    "output_length",
    "transpose_padding",
]


def effective_kernel_size(kernel_size: int, dilation_rate: int) -> int:
    """Return the extent ``(k - 1) * d + 1`` of a dilated kernel."""
    return (kernel_size - 1) * dilation_rate + 1


def transpose_padding(
    kernel_size: int,
    stride: int,
    dilation_rate: int,
    padding: str,
    output_padding: int | None,
) -> tuple[int, int]:
    """Return the (left, right) padding of the equivalent direct convolution.

    The transposed convolution equals a direct convolution, with the flipped
    kernel, of the input dilated by ``stride`` and padded by these amounts.

    Parameters
    ----------
    kernel_size, stride, dilation_rate : int
        The layer's arguments on this axis.
    padding : {"valid", "same"}
        Case-insensitive.
    output_padding : int or None
        The layer's ``output_padding`` on this axis.
    """
    mode = padding.lower()
    k_eff = effective_kernel_size(kernel_size, dilation_rate)
    if mode == "valid":
        extra = max(k_eff, stride) - k_eff if output_padding is None else output_padding
        return k_eff - 1, k_eff - 1 + extra
    if mode == "same":
        if output_padding is None:
            total = stride + k_eff - 2
        else:
            total = k_eff + k_eff % 2 - 2 + output_padding
        left = min(total // 2 + total % 2, k_eff - 1)
        return left, total - left
    raise ValueError(
        f"The `padding` argument must be one of 'valid', 'same'. Received: padding={padding}"
    )


def output_length(
    input_length: int,
    kernel_size: int,
    stride: int,
    padding: str,
    output_padding: int | None = None,
    dilation_rate: int = 1,
) -> int:
    """Return Keras's output length on one axis.

    This is ``compute_conv_transpose_output_shape`` of Keras for one axis.
    """
    mode = padding.lower()
    k_eff = effective_kernel_size(kernel_size, dilation_rate)
    if mode == "valid":
        extra = max(k_eff, stride) - k_eff if output_padding is None else output_padding
        return (input_length - 1) * stride + k_eff + extra
    if mode == "same":
        if output_padding is None:
            return input_length * stride
        return (input_length - 1) * stride + k_eff % 2 + output_padding
    raise ValueError(
        f"The `padding` argument must be one of 'valid', 'same'. Received: padding={padding}"
    )


@dataclass(frozen=True)
class AxisGeometry:
    """The geometry of one spatial axis of a transposed convolution.

    Attributes
    ----------
    input_length : int
        Input length on this axis.
    kernel_size, stride, dilation : int
        The layer's arguments on this axis.
    crop_left : int
        Full-output index of output index 0 (negative: zeros precede the
        full output).
    output_length : int
        Keras's output length.
    """

    input_length: int
    kernel_size: int
    stride: int
    dilation: int
    crop_left: int
    output_length: int

    @property
    def k_eff(self) -> int:
        """The dilated kernel extent."""
        return effective_kernel_size(self.kernel_size, self.dilation)

    @property
    def full_length(self) -> int:
        """Length of the uncropped output, ``(n - 1) * stride + k_eff``."""
        return (self.input_length - 1) * self.stride + self.k_eff

    @property
    def crop_right(self) -> int:
        """What is trimmed on the high side (negative: zeros appended)."""
        return self.full_length - self.crop_left - self.output_length

    def input_range(self, out_start: int, out_stop: int) -> tuple[int, int]:
        """Input index range ``[start, stop)`` that output ``[out_start, out_stop)`` needs."""
        return input_range_for_output(
            out_start + self.crop_left,
            out_stop + self.crop_left,
            self.k_eff,
            self.stride,
            self.input_length,
        )

    def world_offset(self) -> float:
        """Input index (fractional) that output index 0 corresponds to.

        Output index ``o`` corresponds to input index
        ``(o + crop_left - (k_eff - 1) / 2) / stride``: the centre of each kernel
        footprint sits on the input voxel that produced it.
        """
        return (self.crop_left - (self.k_eff - 1) / 2) / self.stride


def axis_geometry(
    input_length: int,
    kernel_size: int,
    stride: int,
    padding: str,
    output_padding: int | None = None,
    dilation_rate: int = 1,
) -> AxisGeometry:
    """Return the :class:`AxisGeometry` of one axis."""
    left, _ = transpose_padding(kernel_size, stride, dilation_rate, padding, output_padding)
    k_eff = effective_kernel_size(kernel_size, dilation_rate)
    return AxisGeometry(
        input_length=input_length,
        kernel_size=kernel_size,
        stride=stride,
        dilation=dilation_rate,
        crop_left=k_eff - 1 - left,
        output_length=output_length(
            input_length, kernel_size, stride, padding, output_padding, dilation_rate
        ),
    )


def input_range_for_output(
    full_start: int, full_stop: int, k_eff: int, stride: int, input_length: int
) -> tuple[int, int]:
    """Input indices whose footprint meets full-output indices ``[full_start, full_stop)``.

    Input ``i`` touches full indices ``[i * stride, i * stride + k_eff)``. The
    result is clipped to ``[0, input_length)`` and may be empty (start == stop).
    """
    if full_stop <= full_start:
        return 0, 0
    # i * stride + k_eff - 1 >= full_start  and  i * stride <= full_stop - 1
    start = max(0, -((k_eff - 1 - full_start) // stride))
    stop = min(input_length, (full_stop - 1) // stride + 1)
    if stop <= start:
        return 0, 0
    return start, stop
