"""Verifying: streaming size and md5, FITS structure and checksums, whole-mirror checks."""

from engine.verify.file import check_file
from engine.verify.fits import verify_fits
from engine.verify.stream import StreamCheck, estimate_ceiling

__all__ = ["StreamCheck", "check_file", "estimate_ceiling", "verify_fits"]
