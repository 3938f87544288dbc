"""FITS structure and checksums of a file on disk: every HDU parses, every CHECKSUM/DATASUM holds.

Blocking (it reads the whole file): run it in a thread, never on the event loop.

What is checked, and why not with astropy's own checksum code:

* The file starts with ``SIMPLE  =`` and is a whole number of 2880-byte blocks.
* astropy parses every header (``lazy_load_hdus=False``) and the HDUs tile the file exactly: each
  one starts where the one before ends, and the last one ends at the end of the file. A body cut
  short by whole blocks, or trailing blocks after the last HDU, fail here; astropy would only *warn*
  ("File may have been truncated", "Unexpected extra padding"), and catching warnings is not
  thread-safe.
* CHECKSUM and DATASUM are verified on the raw bytes, as the FITS standard defines them: the 32-bit
  ones' complement sum of the whole HDU must be -0, and that of its data must equal DATASUM.
  astropy's ``verify_checksum()`` instead sums a *re-serialised* header, so a damaged byte that does
  not survive the round trip (e.g. in the blank space after ``END``) would pass. The raw sum is also
  cheaper (numpy over a memory map: ~0.2 ms for a 2 MB light curve).
* An HDU without CHECKSUM or DATASUM has its data parsed (table layout, array shape), so at least
  a header that lies about its data is caught.

The sums read the file through a read-only memory map (no copy); astropy reads the headers and the
data it parses itself (``memmap=False``: as fast as a map for a light curve, and it leaves no map
alive in the arrays after the file is closed).
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import BinaryIO

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from engine.exceptions import NotFitsError

FITS_BLOCK = 2880
FITS_SIGNATURE = b"SIMPLE  ="
_NEGATIVE_ZERO = 0xFFFFFFFF  # the ones' complement sum of an HDU whose CHECKSUM is right
_HINT = "the copy is corrupt; it will be fetched again (or repaired by `tessmirror verify --repair`)"


def ones_complement_sum(data: bytes | memoryview | mmap.mmap) -> int:
    """The FITS checksum sum: 32-bit big-endian words added with end-around carry (len % 4 == 0)."""
    total = int(np.frombuffer(data, dtype=">u4").sum(dtype=np.uint64))  # < 2**64 up to 16 GiB
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def verify_fits(path: Path | str) -> None:
    """Raise NotFitsError unless `path` is whole, well-formed FITS whose checksums all verify."""
    path = Path(path)
    with open(path, "rb") as handle:  # FileNotFoundError propagates: the caller reports "missing"
        size = handle.seek(0, 2)
        if size == 0:
            raise NotFitsError(f"{path.name}: the file is empty", hint=_HINT)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as raw:
            _verify(path, handle, raw, size)


def _verify(path: Path, handle: BinaryIO, raw: mmap.mmap, size: int) -> None:
    if raw[: len(FITS_SIGNATURE)] != FITS_SIGNATURE:
        raise NotFitsError(
            f"{path.name}: starts with {raw[:16]!r}, not {FITS_SIGNATURE!r}: not a FITS file", hint=_HINT
        )
    if size % FITS_BLOCK:
        raise NotFitsError(
            f"{path.name}: {size} bytes is not a whole number of {FITS_BLOCK}-byte FITS blocks (truncated)",
            hint=_HINT,
        )
    try:
        handle.seek(0)
        # Our handle, not the path: astropy then never owns (or, on an error, leaks) a file object.
        with fits.open(handle, memmap=False, lazy_load_hdus=False, checksum=False) as hdul:
            if len(hdul) == 0:
                raise NotFitsError(f"{path.name}: no HDU found", hint=_HINT)
            end = 0
            for index, hdu in enumerate(hdul):
                end = _verify_hdu(path, raw, size, index, hdu, expected_start=end)
    except NotFitsError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, VerifyError, Warning) as exc:
        # astropy reports unparsable headers/data with these (VerifyError: e.g. a bad TFORM; warnings
        # where an application turned them into errors); anything else is a bug worth seeing.
        raise NotFitsError(
            f"{path.name}: not a readable FITS file ({type(exc).__name__}: {exc})", hint=_HINT
        ) from exc
    if end != size:
        raise NotFitsError(
            f"{path.name}: {size - end} bytes follow the last HDU (which ends at byte {end})", hint=_HINT
        )


def _verify_hdu(
    path: Path, raw: mmap.mmap, size: int, index: int, hdu: fits.hdu.base._BaseHDU, *, expected_start: int
) -> int:
    """Check one HDU's place in the file and its checksums; return the offset where it ends."""
    name = f"HDU {index} ({hdu.name or index})"
    info = hdu.fileinfo()
    start, data_start, data_span = info["hdrLoc"], info["datLoc"], info["datSpan"]
    end = data_start + data_span
    if start != expected_start:
        raise NotFitsError(
            f"{path.name}: {name} starts at byte {start}, not where the HDU before it ends "
            f"({expected_start})",
            hint=_HINT,
        )
    if end > size:
        raise NotFitsError(
            f"{path.name}: {name} needs {end} bytes but the file has {size} (truncated)", hint=_HINT
        )
    header = hdu.header
    if "CHECKSUM" in header and ones_complement_sum(memoryview(raw)[start:end]) != _NEGATIVE_ZERO:
        raise NotFitsError(f"{path.name}: {name} fails its CHECKSUM", hint=_HINT)
    if "DATASUM" in header:
        try:
            declared = int(str(header["DATASUM"]).strip())
        except ValueError:
            raise NotFitsError(
                f"{path.name}: {name} has an unreadable DATASUM {header['DATASUM']!r}", hint=_HINT
            ) from None
        if ones_complement_sum(memoryview(raw)[data_start:end]) != declared:
            raise NotFitsError(f"{path.name}: {name} fails its DATASUM", hint=_HINT)
    elif "CHECKSUM" not in header:
        # Nothing vouches for the bytes: at least the data must parse as the header declares it.
        # (With a checksum that holds, the bytes are the producer's own; parsing a 20,000-row table
        # again would cost ~5 ms a light curve for nothing.)
        _ = hdu.data
    return end
