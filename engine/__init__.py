"""tessmirror: verified, resumable, polite bulk downloads of TESS products from MAST."""

__version__ = "0.1.0"
