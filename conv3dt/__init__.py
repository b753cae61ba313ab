"""conv3dt: a Keras-exact 3D transposed convolution for volumes on disk."""

from conv3dt.ops import conv3d_transpose

__version__ = "0.1.0"

__all__ = ["__version__", "conv3d_transpose"]
