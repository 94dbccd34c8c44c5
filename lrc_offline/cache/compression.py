"""Codec names -> Zarr v3 compressors, numcodecs codecs and .npy member encodings.

A field's codec is a name (see `schema.CODECS`): ``blosc-<cname>-<shuffle>``, ``zstd`` or ``none``.
Levels are fixed here (blosc clevel 3, zstd level 3; see the measurements in `schema.py`), so the same
input always gives the same bytes. Both shard formats use the same numcodecs implementations, so a
field compresses to the same ratio in Zarr chunks and in tar members.

In a WebDataset tar a member is a whole ``.npy`` file, compressed as a unit: ``.npy`` (none),
``.npy.zst`` (a standard zstd frame) or ``.npy.blosc`` (a self-describing blosc frame, decodable with
``numcodecs.Blosc().decode``).
"""

from __future__ import annotations

import io
import struct

import numcodecs
import numpy as np
import zarr.codecs

from lrc_offline.cache.schema import CODECS, CacheFormatError

__all__ = ["BLOSC_CLEVEL", "ZSTD_LEVEL", "zarr_compressors", "npy_suffix", "compress_npy", "decompress_npy"]

BLOSC_CLEVEL = 3
ZSTD_LEVEL = 3

_SHUFFLE = {
    "noshuffle": numcodecs.Blosc.NOSHUFFLE,
    "shuffle": numcodecs.Blosc.SHUFFLE,
    "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
}
_BLOSC_MAGIC_LEN = 16
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A .npy header is padded to a multiple of 64 bytes and is rarely over 128; anything declaring far
# more than the expected payload is not a member this format wrote.
_NPY_HEADER_ALLOWANCE = 4096


def _parts(codec: str) -> tuple[str, str, str]:
    if codec not in CODECS:
        raise CacheFormatError(f"codec {codec!r} is not one of {list(CODECS)}")
    if codec.startswith("blosc-"):
        _, cname, shuffle = codec.split("-")
        return "blosc", cname, shuffle
    return codec, "", ""


def zarr_compressors(codec: str) -> list:
    """Zarr v3 compressor list for `codec` (empty for none); blosc's typesize follows the array dtype."""
    kind, cname, shuffle = _parts(codec)
    if kind == "blosc":
        return [zarr.codecs.BloscCodec(cname=cname, clevel=BLOSC_CLEVEL, shuffle=shuffle)]
    if kind == "zstd":
        return [zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)]
    return []


def npy_suffix(codec: str) -> str:
    """Tar member suffix of a field stored with `codec`: .npy, .npy.zst or .npy.blosc."""
    kind = _parts(codec)[0]
    return {"blosc": ".npy.blosc", "zstd": ".npy.zst", "none": ".npy"}[kind]


def compress_npy(array: np.ndarray, codec: str) -> bytes:
    """The bytes of ``np.save(array)``, compressed with `codec`."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    raw = buffer.getvalue()
    kind, cname, shuffle = _parts(codec)
    if kind == "none":
        return raw
    if kind == "zstd":
        return bytes(numcodecs.Zstd(level=ZSTD_LEVEL).encode(raw))
    # Blosc shuffles by the buffer's item size: present the file as items of the array's width (the
    # header is padded to a multiple of 64 bytes, so the element bytes stay aligned to it).
    items = np.frombuffer(raw, dtype=f"u{array.dtype.itemsize}")
    return bytes(numcodecs.Blosc(cname=cname, clevel=BLOSC_CLEVEL, shuffle=_SHUFFLE[shuffle]).encode(items))


def _declared_size(data: bytes, kind: str, where: str) -> int:
    """Decompressed size a blosc or zstd frame declares in its header (checked before decoding)."""
    if kind == "blosc":
        if len(data) < _BLOSC_MAGIC_LEN:
            raise CacheFormatError(f"{where}: truncated blosc frame")
        return struct.unpack_from("<I", data, 4)[0]
    if data[:4] != _ZSTD_MAGIC or len(data) < 6:
        raise CacheFormatError(f"{where}: not a zstd frame")
    descriptor = data[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    offset = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size_len = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size_len == 0 or len(data) < offset + size_len:
        raise CacheFormatError(f"{where}: zstd frame does not declare its size")
    size = int.from_bytes(data[offset : offset + size_len], "little")
    return size + 256 if size_len == 2 else size


def decompress_npy(data: bytes, codec: str, expected_bytes: int, where: str) -> np.ndarray:
    """Decode a tar member written by `compress_npy` without ever unpickling.

    Args:
        data: The member's bytes.
        codec: The field's codec, which fixes the framing.
        expected_bytes: Payload size the field's spec implies; frames declaring much more are refused
            before any allocation, so a hostile member cannot exhaust memory.
        where: Tar and member name, for error messages.

    Raises:
        CacheFormatError: bad framing, an oversized frame, or a .npy that does not parse.
    """
    kind = _parts(codec)[0]
    limit = expected_bytes + _NPY_HEADER_ALLOWANCE
    if kind != "none":
        declared = _declared_size(data, kind, where)
        if declared > limit:
            raise CacheFormatError(f"{where}: frame declares {declared} bytes, expected at most {limit}")
        try:
            codec_impl = numcodecs.Blosc() if kind == "blosc" else numcodecs.Zstd()
            data = bytes(codec_impl.decode(data))
        except Exception as err:  # numcodecs raises RuntimeError/ValueError variants on bad frames
            raise CacheFormatError(f"{where}: cannot decompress ({err})") from err
    if len(data) > limit:
        raise CacheFormatError(f"{where}: {len(data)} bytes, expected at most {limit}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)  # an object array (a pickle) is refused
    except (ValueError, EOFError, OSError) as err:
        raise CacheFormatError(f"{where}: not a valid .npy array ({err})") from err
