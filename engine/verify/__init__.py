"""Verifying: streaming size and md5, FITS structure and checksums, whole-mirror checks."""
