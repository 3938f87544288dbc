"""Re-check one finished file on disk (used by `tessmirror verify` and by --recheck)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine.exceptions import ChecksumMismatchError
from engine.models import PlanItem, VerifyLevel
from engine.verify.fits import check_whole_blocks, verify_fits
from engine.verify.stream import check_size, is_fits_item, sniff_prefix

_BLOCK = 1024 * 1024


def check_file(path: Path, *, size: int, md5: str, level: VerifyLevel) -> str:
    """Check `path` against the declared `size` (-1: unknown) and `md5` ("" : unknown) at `level`.

    Returns the md5 hex of the file ("" at level SIZE, where it is not computed). Raises
    FileNotFoundError, SizeMismatchError, ChecksumMismatchError or NotFitsError.
    """
    path = Path(path)
    level = VerifyLevel.parse(level)
    nbytes = path.stat().st_size  # FileNotFoundError when missing, as documented
    item = PlanItem(url="", filename=path.name, size=size, md5=md5.lower())
    check_size(path.name, nbytes, total=None, item=item, tolerance=0.0)
    with path.open("rb") as handle:
        # The sniff costs one read; do it at every level, like the streaming check does.
        sniff_prefix(item, handle.read(16), complete=True)
        digest = ""
        if level >= VerifyLevel.CHECKSUM:
            handle.seek(0)
            hasher = hashlib.md5(usedforsecurity=False)
            buffer = bytearray(_BLOCK)
            view = memoryview(buffer)
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
            digest = hasher.hexdigest()
            if item.md5 and digest != item.md5:
                raise ChecksumMismatchError(
                    f"{path}: md5 {digest} does not match the declared {item.md5}",
                    hint="delete the file and run the mirror again to fetch a fresh copy",
                )
    if level >= VerifyLevel.FITS and is_fits_item(item):
        check_whole_blocks(path, nbytes, hint="delete the file and run the mirror again")
        verify_fits(path)
    return digest
