"""conv3dt: a Keras-exact 3D transposed convolution for volumes on disk.

The public API: :func:`conv3d_transpose` (the functional op) and
:class:`Conv3DTranspose` (the layer, also named ``Convolution3DTranspose``).
"""

from conv3dt.layer import Conv3DTranspose, Convolution3DTranspose
from conv3dt.ops import conv3d_transpose
from conv3dt.presets import preset_layer

__version__ = "0.1.0"

__all__ = [
    "Conv3DTranspose",
    "Convolution3DTranspose",
    "__version__",
    "conv3d_transpose",
    "preset_layer",
]
