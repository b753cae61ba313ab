"""Gzip compression and decompression for ``.nii.gz``: ISA-L when it imports, else zlib.

Compression goes through python-isal (Intel's ISA-L, a dependency of conv3dt)
at its level 1, about four times as fast as the standard library's zlib at
level 1 with nearly the same ratio, or through the standard library's
:mod:`zlib` where isal cannot be imported; :data:`COMPRESSOR` names the one in
use. :class:`GzipBlockWriter` cuts the stream into blocks that a small thread
pool compresses at once and writes them in order as one gzip member, the way
pigz does: each block is a run of deflate blocks primed with the 32 KiB before
it and ended by a sync flush (a byte-aligned empty stored block), so the
blocks join into one deflate stream, and the member's CRC32 follows from the
blocks' CRCs. One member is what every gzip reader handles, including those
that stop after the first member.

Decompression uses the standard library's :func:`zlib.decompressobj`: the
NIfTI reader snapshots its position with ``copy()``, which ISA-L's
decompressor lacks, and a ``.nii.gz`` read is a small part of an upsampling
job (the input is a fraction of the output). zlib checks each member's CRC32
and length when it reaches the member's end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import struct
import zlib
from types import ModuleType, TracebackType
from typing import Any, BinaryIO

from conv3dt.engine.threads import get_threads

__all__ = [
    "BLOCK_SIZE",
    "COMPRESSOR",
    "ERRORS",
    "LEVEL",
    "MAX_THREADS",
    "MIN_PARALLEL_BYTES",
    "GzipBlockWriter",
    "crc32_combine",
    "decompressobj",
    "describe",
    "threads_for",
    "writer_memory_bytes",
]

#: Uncompressed bytes per block compressed on its own thread: long enough that
#: handing a block to a thread costs nothing next to compressing it, short
#: enough that the blocks in flight stay a few tens of MiB.
BLOCK_SIZE = 4 << 20
#: Most compression threads: every thread adds blocks in flight, and a job's
#: computation needs the cores too.
MAX_THREADS = 4
#: Outputs smaller than this are compressed on the calling thread as one
#: stream: ISA-L takes well under 0.1 s for them, and no blocks are held.
MIN_PARALLEL_BYTES = 8 * BLOCK_SIZE
_DICTIONARY = 32 << 10  # deflate's window: what a block may refer back to
# A compressor's own state (measured: ISA-L level 1 about 370 KiB, zlib 256 KiB).
_STATE_BYTES = 512 << 10
# Most bytes one compress call takes when compressing on the calling thread: its
# output (and zlib's growing output buffer) stay a few hundred KiB.
_STREAM_PIECE = 256 << 10
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip wrapper around deflate
_RAW_WBITS = -zlib.MAX_WBITS  # bare deflate


def _fast_library() -> ModuleType | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib


def _select() -> tuple[str, ModuleType, int]:
    """``(name, module, level)`` of the compression library used here."""
    module = _fast_library()
    if module is None:
        return "zlib", zlib, 1
    # ISA-L's level 0 is a little faster but never falls back to stored
    # blocks: float32 mantissas then grow by a third (measured).
    return "isal", module, 1


COMPRESSOR, _compress_module, LEVEL = _select()
#: What a damaged stream raises from whichever library reads it.
ERRORS: tuple[type[Exception], ...] = (
    (zlib.error,) if _compress_module is zlib else (zlib.error, _compress_module.error)
)


def describe() -> str:
    """The compression library and level in use, e.g. ``"isal level 1"``."""
    return f"{COMPRESSOR} level {LEVEL}"


def decompressobj() -> Any:
    """A decompressor of one gzip member that supports ``copy()`` (:func:`zlib.decompressobj`).

    It checks the member's CRC32 and length (ISIZE) when it reaches its end.
    """
    return zlib.decompressobj(_GZIP_WBITS)


# -- CRC32 of concatenated data ------------------------------------------------


def _gf2_times(matrix: list[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def _crc32_combine_python(crc1: int, crc2: int, length2: int) -> int:
    """zlib's ``crc32_combine`` in Python, for a library without it (the standard one).

    Appending B to A shifts A's CRC register over ``length2`` zero bytes
    before B's CRC is added; the shift is a 32x32 matrix over GF(2), raised to
    that power by repeated squaring.
    """
    if length2 <= 0:
        return crc1
    # The operator of one zero bit on the CRC register, then 2, 4, ... bits.
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        # Apply one zero byte's operator and its squares for each bit of length2.
        even = _gf2_square(odd)
        if length2 & 1:
            crc1 = _gf2_times(even, crc1)
        length2 >>= 1
        if not length2:
            break
        odd = _gf2_square(even)
        if length2 & 1:
            crc1 = _gf2_times(odd, crc1)
        length2 >>= 1
        if not length2:
            break
    return crc1 ^ crc2


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)``.

    Parameters
    ----------
    crc1, crc2 : int
        CRC32s (as :func:`zlib.crc32` returns them) of the first and second part.
    length2 : int
        Length of the second part in bytes.
    """
    combine = getattr(_compress_module, "crc32_combine", None)
    if combine is None:
        return _crc32_combine_python(crc1, crc2, length2)
    return int(combine(crc1, crc2, length2)) & 0xFFFFFFFF


# -- compression -----------------------------------------------------------------


def _compressed_bound(size: int) -> int:
    # ISA-L (level >= 1) and zlib fall back to stored blocks on incompressible
    # data; a tenth on top covers their block headers with room to spare.
    return size + size // 10 + 1024


def writer_memory_bytes(threads: int | None = None, block_size: int | None = None) -> int:
    """Most bytes a :class:`GzipBlockWriter` holds: the block being filled and those in flight.

    Parameters
    ----------
    threads : int, optional
        Compression threads (default: :func:`conv3dt.engine.threads.get_threads`,
        at most :data:`MAX_THREADS`).
    block_size : int, optional
        Uncompressed bytes per block (default :data:`BLOCK_SIZE`).
    """
    block_size = BLOCK_SIZE if block_size is None else int(block_size)
    workers = _workers(threads)
    if workers == 1:
        # One stream on the calling thread: its state and one piece's output
        # (twice: the library's growing buffer and the bytes made of it).
        return _STATE_BYTES + 2 * _compressed_bound(_STREAM_PIECE)
    in_flight = workers + 1
    per_block = block_size + _compressed_bound(block_size) + _DICTIONARY + _STATE_BYTES
    return block_size + in_flight * per_block


def _workers(threads: int | None) -> int:
    return max(1, min(MAX_THREADS, get_threads() if threads is None else int(threads)))


def threads_for(size: int | None = None) -> int:
    """Compression threads worth using for ``size`` uncompressed bytes.

    One (compression on the calling thread, no blocks held) below
    :data:`MIN_PARALLEL_BYTES`, else :func:`~conv3dt.engine.threads.get_threads`
    up to :data:`MAX_THREADS`; the latter also for an unknown ``size`` (None).
    """
    return 1 if size is not None and size < MIN_PARALLEL_BYTES else _workers(None)


def _compress_block(
    block: bytes | bytearray, dictionary: bytes, last: bool
) -> tuple[bytes, int, int]:
    """Deflate one block primed with the bytes before it: ``(deflate, crc32, length)``."""
    module = _compress_module
    if dictionary:
        compressor = module.compressobj(
            LEVEL, module.DEFLATED, _RAW_WBITS, 9, module.Z_DEFAULT_STRATEGY, dictionary
        )
    else:
        compressor = module.compressobj(LEVEL, module.DEFLATED, _RAW_WBITS)
    # A sync flush ends the block byte-aligned and not final, so the next
    # block's deflate data continues the same stream.
    body = compressor.compress(block)
    body += compressor.flush(module.Z_FINISH if last else module.Z_SYNC_FLUSH)
    return body, module.crc32(block) & 0xFFFFFFFF, len(block)


def _gzip_header(name: str) -> bytes:
    """A gzip member header: no time stamp (reproducible files), the original name."""
    try:
        fname = name.encode("latin-1")
    except UnicodeEncodeError:
        fname = b""
    fname = fname.replace(b"\0", b"")
    flags = 0x08 if fname else 0
    xfl = 4 if LEVEL <= 1 else 0  # "fastest algorithm", as gzip -1 marks it
    header = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, flags, 0, xfl, 255)
    return header + (fname + b"\0" if fname else b"")


class GzipBlockWriter:
    """Compress a stream into one gzip member on a few threads, writing it in order.

    With several threads, :meth:`write` copies the bytes into a block; each
    full block is handed to a thread pool, and the compressed blocks are
    written to ``raw`` in order, from the calling thread, as they complete. At
    most ``threads`` blocks are in flight besides the one being filled, so
    memory stays within :func:`writer_memory_bytes`. With one thread the bytes
    are compressed at once on the calling thread as one stream, without copies.
    :meth:`close` compresses the last block and writes the trailer (CRC32 and
    length); :meth:`abort` stops without writing more. Neither closes ``raw``.

    Parameters
    ----------
    raw : binary file
        Where the member is written (its ``write`` must take all it is given).
    name : str
        The original file name stored in the header (gzip's FNAME), optional.
    threads : int, optional
        Compression threads, at most :data:`MAX_THREADS` (default: the engines'
        :func:`~conv3dt.engine.threads.get_threads`); see :func:`threads_for`.
    block_size : int, optional
        Uncompressed bytes per block, at least 64 KiB (default :data:`BLOCK_SIZE`).
    """

    def __init__(
        self,
        raw: BinaryIO,
        *,
        name: str = "",
        threads: int | None = None,
        block_size: int | None = None,
    ) -> None:
        block_size = BLOCK_SIZE if block_size is None else int(block_size)
        if block_size < 2 * _DICTIONARY:
            raise ValueError(f"`block_size` must be at least 64 KiB. Received {block_size}")
        self._raw = raw
        self._block_size = int(block_size)
        self._threads = _workers(threads)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._block: bytearray | None = None
        self._filled = 0  # bytes of the block written so far
        self._dictionary = b""
        self._stream: Any = None  # the one compressor when compressing on this thread
        self._crc = 0
        self._size = 0
        self._closed = False
        raw.write(_gzip_header(name))

    @property
    def threads(self) -> int:
        """Compression threads this writer uses."""
        return self._threads

    def write(self, data: Any) -> int:
        """Append bytes (anything exposing the buffer protocol); returns their count.

        The bytes are compressed or copied before this returns, so the caller
        may reuse its buffer at once.
        """
        if self._closed:
            raise ValueError("write to a closed GzipBlockWriter")
        view = memoryview(data).cast("B")
        count = len(view)
        if self._threads == 1:
            self._compress_here(view)
            return count
        while len(view):
            if self._block is None:
                # A new buffer per block: the previous one is being compressed.
                self._block = bytearray(self._block_size)
            room = self._block_size - self._filled
            take = min(room, len(view))
            self._block[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._block_size:
                self._submit(last=False)
        return count

    def _compress_here(self, view: memoryview) -> None:
        module = _compress_module
        if self._stream is None:
            self._stream = module.compressobj(LEVEL, module.DEFLATED, _RAW_WBITS)
        # In small pieces, so each output stays within its bound.
        for start in range(0, len(view), _STREAM_PIECE):
            piece = view[start : start + _STREAM_PIECE]
            self._crc = module.crc32(piece, self._crc) & 0xFFFFFFFF
            self._size += len(piece)
            body = self._stream.compress(piece)
            if body:
                self._raw.write(body)

    def _submit(self, last: bool) -> None:
        block = self._block if self._block is not None else bytearray()
        if self._filled < len(block):
            del block[self._filled :]  # the last block, shorter
        self._block, self._filled = None, 0
        dictionary = self._dictionary
        self._dictionary = bytes(block[-_DICTIONARY:])
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="conv3dt-gzip"
            )
        self._pending.append(self._pool.submit(_compress_block, block, dictionary, last))
        # Bounded memory: wait for the oldest block before more are handed out.
        while len(self._pending) > self._threads:
            self._write_oldest()

    def _write_oldest(self) -> None:
        body, crc, length = self._pending.popleft().result()
        self._raw.write(body)
        self._crc = crc32_combine(self._crc, crc, length)
        self._size += length

    def close(self) -> None:
        """Compress what is left, write every block and the trailer, and stop the threads.

        On an error the threads are stopped too and nothing more is written.
        """
        if self._closed:
            return
        try:
            if self._threads == 1:
                self._compress_here(memoryview(b""))  # the compressor exists
                self._raw.write(self._stream.flush(_compress_module.Z_FINISH))
                self._stream = None
            else:
                self._submit(last=True)
            while self._pending:
                self._write_oldest()
            self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._shutdown()

    def abort(self) -> None:
        """Stop: drop the blocks not yet written and wait for the threads to end."""
        self._closed = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._block, self._filled = None, 0
        self._stream = None
        self._shutdown()

    def _shutdown(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # A running block takes milliseconds: waiting for it leaves no thread behind.
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GzipBlockWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
