"""Synthetic full-frame images (`_ffic.fits`, `_ffir.fits`): valid FITS, CHECKSUM/DATASUM in every HDU.

Layout, chosen so that the md5 of thousands of exposures stays cheap:

* a primary HDU (header only) and the image HDU(s) are the same for every exposure of one
  (sector, camera, CCD, product): `_ffic` has a float32 calibrated image and its float32
  uncertainty image (as SPOC's calibrated FFIs since sector 1: about 35 MB in full size), `_ffir`
  one int32 raw image (about 18 MB);
* a last, header-only extension `EXPOSURE` carries what differs per exposure (obs_id, times,
  pointing), so every file has its own bytes.

So the md5 of a file is the md5 state of the shared prefix (hashed once per CCD and product, then
copied) updated with one small trailer: 16 CCDs x 300 exposures x 2 products of any size cost 32
prefix passes plus 9,600 trailers. Pixel values are pseudo-random, generated in row blocks from
(seed, sector, camera, ccd, product, block), so rendering can stream a 35 MB file without holding it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np

from engine.archive.fitsgen import BLOCK, FileIdentity, card, header_block, ones_complement_sum

FFI_PRODUCTS = ("ffic", "ffir")
FULL_DIMS = (2136, 2078)  # columns x rows of a whole frame, collateral pixels included
SMALL_DIMS = (16, 16)  # 1 KiB a plane: a small ffic is 6 FITS blocks (17,280 bytes)
_ROWS_PER_BLOCK = 256
_IMAGES = {"ffic": (("CAL", -32), ("UNCERT", -32)), "ffir": (("RAW", 32),)}
_NUMPY = {-32: ">f4", 32: ">i4"}


def ffi_dims(option: str | int) -> tuple[int, int]:
    """Image size for the `ffi_file_size` option: 'small', 'full' or a side length in pixels."""
    if isinstance(option, bool):
        raise ValueError(f"ffi_file_size {option!r} is not valid; use 'small', 'full' or a side in pixels")
    if isinstance(option, int):
        if not 1 <= option <= 4096:
            raise ValueError(f"ffi_file_size {option} is out of range; use a side of 1-4096 pixels")
        return option, option
    if option == "small":
        return SMALL_DIMS
    if option == "full":
        return FULL_DIMS
    raise ValueError(f"ffi_file_size {option!r} is not valid; use 'small', 'full' or a side in pixels")


def _padded(nbytes: int) -> int:
    return nbytes + (-nbytes % BLOCK)


def _pixels(key: tuple[int, ...], bitpix: int, dims: tuple[int, int], first: int, rows: int) -> bytes:
    """Rows `first`..`first+rows` of one image: the same bytes however the image is chunked."""
    width = dims[0]
    rng = np.random.default_rng([*key, bitpix & 0xFF, first])
    if bitpix == -32:
        values = (1000.0 + 30.0 * rng.standard_normal((rows, width))).astype(_NUMPY[bitpix])
    else:
        values = rng.integers(0, 1 << 17, (rows, width)).astype(_NUMPY[bitpix])
    return values.tobytes()


def _data_chunks(key: tuple[int, ...], bitpix: int, dims: tuple[int, int]) -> Iterator[bytes]:
    """The image's data unit in chunks, padded with zeros to whole blocks."""
    height = dims[1]
    total = 0
    for first in range(0, height, _ROWS_PER_BLOCK):
        chunk = _pixels(key, bitpix, dims, first, min(_ROWS_PER_BLOCK, height - first))
        total += len(chunk)
        yield chunk
    if total % BLOCK:
        yield b"\0" * (-total % BLOCK)


@lru_cache(maxsize=128)
def _datasum(key: tuple[int, ...], bitpix: int, dims: tuple[int, int]) -> int:
    total = 0
    for chunk in _data_chunks(key, bitpix, dims):
        total = ones_complement_sum(chunk, total)
    return total


def _key(identity: FileIdentity, seed: int) -> tuple[int, ...]:
    return (
        seed & 0xFFFFFFFF,
        identity.sector,
        identity.camera,
        identity.ccd,
        FFI_PRODUCTS.index(identity.product),
    )


@lru_cache(maxsize=128)
def _primary(sector: int, camera: int, ccd: int, product: str) -> bytes:
    cards = [
        card("SIMPLE", True, "conforms to FITS standards"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 0, "number of array dimensions"),
        card("EXTEND", True, "file contains extensions"),
        card("NEXTEND", len(_IMAGES[product]) + 1, "number of standard extensions"),
        card("ORIGIN", "NASA/Ames", "institution responsible for creating this file"),
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
        card("IMAGTYPE", "cal" if product == "ffic" else "raw", "FFI image type"),
        card("SECTOR", sector, "Observing sector"),
        card("CAMERA", camera, "Camera number"),
        card("CCD", ccd, "CCD chip number"),
        card("CREATOR", "SPOC FfiExporter (synthetic)", "pipeline job and program used"),
    ]
    return header_block(cards, 0)


def _image_header(extname: str, bitpix: int, dims: tuple[int, int], datasum: int) -> bytes:
    cards = [
        card("XTENSION", "IMAGE", "marks the beginning of a new HDU"),
        card("BITPIX", bitpix, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", dims[0], "columns"),
        card("NAXIS2", dims[1], "rows"),
        card("PCOUNT", 0, "number of parameters"),
        card("GCOUNT", 1, "number of groups"),
        card("INHERIT", True, "inherit the primary header"),
        card("EXTNAME", extname, "name of extension"),
        card("BUNIT", "electrons/s" if bitpix == -32 else "ADU", "physical units of image data"),
    ]
    return header_block(cards, datasum)


def _prefix_pieces(identity: FileIdentity, dims: tuple[int, int], seed: int) -> Iterator[bytes]:
    """Everything before the EXPOSURE trailer: shared by every exposure of the CCD and product."""
    key = _key(identity, seed)
    yield _primary(identity.sector, identity.camera, identity.ccd, identity.product)
    for extname, bitpix in _IMAGES[identity.product]:
        yield _image_header(extname, bitpix, dims, _datasum(key, bitpix, dims))
        yield from _data_chunks(key, bitpix, dims)


def _trailer(identity: FileIdentity) -> bytes:
    """The header-only EXPOSURE extension: what makes each exposure's file differ."""
    obs_id = identity.name.rsplit("_", 1)[0]
    cards = [
        card("XTENSION", "IMAGE", "marks the beginning of a new HDU"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 0, "number of array dimensions"),
        card("PCOUNT", 0, "number of parameters"),
        card("GCOUNT", 1, "number of groups"),
        card("EXTNAME", "EXPOSURE", "per-exposure keywords"),
        card("OBS_ID", obs_id[:68], "observation id"),
        card("EXPINDEX", identity.tic, "exposure number in the sector"),
        card("CRVAL1", round(identity.ra, 6), "[deg] right ascension of the frame centre"),
        card("CRVAL2", round(identity.dec, 6), "[deg] declination of the frame centre"),
    ]
    return header_block(cards, 0)


def ffi_size(product: str, dims: tuple[int, int]) -> int:
    """Exact size in bytes of any FFI file of this product and image size."""
    primary = len(_primary(1, 1, 1, product))
    images = sum(BLOCK + _padded(dims[0] * dims[1] * abs(bitpix) // 8) for _name, bitpix in _IMAGES[product])
    return primary + images + BLOCK  # every header here fits one block


def render(identity: FileIdentity, *, dims: tuple[int, int], seed: int) -> Iterator[bytes]:
    """The file's bytes in pieces (stream them to disk; a full FFI is never held whole)."""
    yield from _prefix_pieces(identity, dims, seed)
    yield _trailer(identity)


@lru_cache(maxsize=64)
def _prefix_md5(key_identity: FileIdentity, dims: tuple[int, int], seed: int) -> hashlib._Hash:
    md5 = hashlib.md5(usedforsecurity=False)
    for piece in _prefix_pieces(key_identity, dims, seed):
        md5.update(piece)
    return md5


def md5s(identities: Sequence[FileIdentity], *, dims: tuple[int, int], seed: int) -> list[str]:
    """md5 hex of each FFI file: one pass over each shared prefix, then one trailer per file."""
    result = []
    for identity in identities:
        shared = FileIdentity("", identity.product, 0, identity.sector, identity.camera, identity.ccd, 0, 0)
        md5 = _prefix_md5(shared, dims, seed).copy()
        md5.update(_trailer(identity))
        result.append(md5.hexdigest())
    return result
