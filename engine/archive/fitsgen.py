"""Synthetic SPOC-shaped FITS files whose bytes are a pure function of (seed, identity, cadences).

Why it is written by hand and not with astropy: the catalogue must declare the exact size and md5
of up to hundreds of thousands of files without encoding each one through astropy (milliseconds and
a full CHECKSUM pass per file). So a file is assembled from pieces:

* headers are rendered here from a fixed list of cards (one 80-byte card each, so a product's header
  size never depends on the values: `contentLength` is arithmetic, see `file_size`);
* the big table of a product (light curve, pixels, DV series) depends only on (seed, sector,
  cadences) and is built once and cached with its DATASUM, shared by every file of that sector;
* the small APERTURE image is derived from a hash of the file name, so every file differs;
* CHECKSUM of each HDU is the FITS ones'-complement sum of its header plus the cached DATASUM.

The md5 of a file still needs a pass over its bytes (about 2.4 ms for a full 2 MB light curve, tens
of microseconds for a small one); `digest` does that without keeping the file in memory twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from engine.verify.fits import FITS_BLOCK as BLOCK

FULL_LC_BYTES = 2_039_040  # a real full-sector 2-minute light curve: 708 FITS blocks
SMALL_CADENCES = 300
BTJD_SECTOR1_START = 1325.293
SECTOR_DAYS = 27.4
CADENCE_DAYS = 2.0 / 1440.0
PRODUCTS = ("lc", "tp", "dvt", "llc")


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Everything a file's header says about its target. `product` is one of PRODUCTS."""

    name: str
    product: str
    tic: int
    sector: int
    camera: int
    ccd: int
    ra: float
    dec: float
    tessmag: float = 10.0


# -- cards and checksums -------------------------------------------------------------------------
@lru_cache(maxsize=4096, typed=True)  # most cards are the same in every file; only a few per file are new
def card(key: str, value: object = None, comment: str = "") -> bytes:
    """One 80-byte FITS header card in fixed format."""
    if value is None:
        text = f"{key:<8}"
    elif isinstance(value, bool):
        text = f"{key:<8}= {'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)):
        text = f"{key:<8}= {int(value):>20d}"
    elif isinstance(value, (float, np.floating)):
        text = f"{key:<8}= {repr(float(value)).upper():>20}"
    else:
        quoted = "'" + f"{str(value).replace(chr(39), chr(39) * 2):<8}" + "'"
        text = f"{key:<8}= {quoted:<20}"
    if comment:
        text += f" / {comment}"
    return text[:80].ljust(80).encode("ascii")


def _pad(data: bytes, fill: bytes = b"\0") -> bytes:
    return data + fill * (-len(data) % BLOCK)


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """The FITS 32-bit ones'-complement sum of `data` (a multiple of 4 bytes), added to `start`."""
    total = start + int(np.frombuffer(data, dtype=">u4").sum(dtype=np.uint64))
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


_EXCLUDE = (0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F, 0x40, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0x60)


@lru_cache(maxsize=256)
def _encode_byte(byte: int) -> tuple[int, ...]:
    quotient, remainder = byte // 4 + ord("0"), byte % 4
    ch = [quotient + remainder, quotient, quotient, quotient]
    changed = True
    while changed:  # same loop as the FITS standard's reference code (and astropy)
        changed = False
        for excluded in _EXCLUDE:
            for j in (0, 2):
                if excluded in (ch[j], ch[j + 1]):
                    ch[j] += 1
                    ch[j + 1] -= 1
                    changed = True
    return tuple(ch)


def encode_checksum(value: int) -> str:
    """ASCII-encode a 32-bit checksum value as the 16 characters of a CHECKSUM card."""
    asc = [0] * 16
    for i in range(4):
        ch = _encode_byte((value >> ((3 - i) * 8)) & 0xFF)
        for j in range(4):
            asc[4 * j + i] = ch[j]
    return bytes(asc[(i + 15) % 16] for i in range(16)).decode("ascii")


def header_block(cards: list[bytes], datasum: int) -> bytes:
    """Close a header with DATASUM, CHECKSUM and END, and fill in the CHECKSUM over header + data."""
    body = [
        *cards,
        card("CHECKSUM", "0" * 16, "HDU checksum"),
        card("DATASUM", str(datasum), "data unit checksum"),
    ]
    raw = _pad(b"".join([*body, card("END")]), b" ")
    value = ~ones_complement_sum(raw, datasum) & 0xFFFFFFFF
    checksum_card = card("CHECKSUM", encode_checksum(value), "HDU checksum")
    offset = 80 * (len(body) - 2)
    return raw[:offset] + checksum_card + raw[offset + 80 :]


# -- the product tables ---------------------------------------------------------------------------
_LC_COLUMNS = (
    ("TIME", "D", "BJD - 2457000, days"),
    ("TIMECORR", "E", "d"),
    ("CADENCENO", "J", ""),
    ("SAP_FLUX", "E", "e-/s"),
    ("SAP_FLUX_ERR", "E", "e-/s"),
    ("SAP_BKG", "E", "e-/s"),
    ("SAP_BKG_ERR", "E", "e-/s"),
    ("PDCSAP_FLUX", "E", "e-/s"),
    ("PDCSAP_FLUX_ERR", "E", "e-/s"),
    ("QUALITY", "J", ""),
    ("PSF_CENTR1", "D", "pixel"),
    ("PSF_CENTR1_ERR", "E", "pixel"),
    ("PSF_CENTR2", "D", "pixel"),
    ("PSF_CENTR2_ERR", "E", "pixel"),
    ("MOM_CENTR1", "D", "pixel"),
    ("MOM_CENTR1_ERR", "E", "pixel"),
    ("MOM_CENTR2", "D", "pixel"),
    ("MOM_CENTR2_ERR", "E", "pixel"),
    ("POS_CORR1", "E", "pixels"),
    ("POS_CORR2", "E", "pixels"),
)
_TP_COLUMNS = (("TIME", "D", "BJD - 2457000, days"), ("CADENCENO", "J", ""), ("FLUX", "25E", "e-/s"))
_DVT_COLUMNS = (
    ("TIME", "D", "BJD - 2457000, days"),
    ("PHASE", "E", "days"),
    ("LC_INIT", "E", "dimensionless"),
    ("MODEL_INIT", "E", "dimensionless"),
)
_NUMPY_FORMAT = {"D": ">f8", "E": ">f4", "J": ">i4"}
_EXTNAME = {"lc": "LIGHTCURVE", "llc": "LIGHTCURVE", "tp": "PIXELS", "dvt": "TCE_1"}
_CREATOR = {
    "lc": "26493 LightCurveExporterPipelineModule",
    "llc": "26493 LightCurveExporterPipelineModule",
    "tp": "26493 TargetPixelExporterPipelineModule",
    "dvt": "26493 DvTimeSeriesExporterPipelineModule",
}


def _columns(product: str) -> tuple[tuple[str, str, str], ...]:
    return {"lc": _LC_COLUMNS, "llc": _LC_COLUMNS, "tp": _TP_COLUMNS, "dvt": _DVT_COLUMNS}[product]


@lru_cache(maxsize=8)
def _dtype(product: str) -> np.dtype:
    fields = []
    for name, tform, _unit in _columns(product):
        count = int(tform[:-1] or 1)
        fields.append(
            (name, _NUMPY_FORMAT[tform[-1]], (count,)) if count > 1 else (name, _NUMPY_FORMAT[tform[-1]])
        )
    return np.dtype(fields)


def table_rows(product: str, cadences: int) -> int:
    """Rows of a product's table: one per cadence for light curves, fewer for the simpler products."""
    return cadences if product in ("lc", "llc") else max(10, cadences // 10)


def sector_times(sector: int) -> tuple[float, float]:
    start = BTJD_SECTOR1_START + SECTOR_DAYS * (sector - 1)
    return start, start + SECTOR_DAYS - 0.05


@lru_cache(maxsize=64)
def _table_data(product: str, cadences: int, sector: int, seed: int) -> tuple[bytes, int]:
    """The (padded) table bytes of a product for one sector and their DATASUM; shared by its files."""
    rows = table_rows(product, cadences)
    rng = np.random.default_rng([seed, sector, rows, PRODUCTS.index(product)])
    data = np.zeros(rows, dtype=_dtype(product))
    start, _stop = sector_times(sector)
    step = CADENCE_DAYS * cadences / rows
    data["TIME"] = start + step * np.arange(rows)
    for name in data.dtype.names:
        if name == "TIME":
            continue
        if name in ("CADENCENO",):
            data[name] = 90_000 * sector + np.arange(rows)
        elif name == "QUALITY":
            data[name] = np.where(rng.random(rows) < 0.02, 128, 0)
        else:
            shape = data[name].shape
            scale = 1000.0 if "FLUX" in name or "BKG" in name else 1.0
            data[name] = scale * (1.0 + 0.01 * rng.standard_normal(shape))
    raw = _pad(data.tobytes())
    return raw, ones_complement_sum(raw)


def _table_header(identity: FileIdentity, cadences: int, datasum: int) -> bytes:
    target = [
        card("OBJECT", f"TIC {identity.tic}", "string version of target id"),
        card("TICID", identity.tic, "unique tess target identifier"),
        card("RADESYS", "ICRS", "reference frame of celestial coordinates"),
        card("RA_OBJ", round(identity.ra, 6), "[deg] right ascension"),
        card("DEC_OBJ", round(identity.dec, 6), "[deg] declination"),
    ]
    head = _table_cards_head(identity.product, cadences)
    tail = _table_cards_tail(identity.product, identity.sector)
    return header_block([*head, *target, *tail], datasum)


@lru_cache(maxsize=64)
def _table_cards_head(product: str, cadences: int) -> tuple[bytes, ...]:
    """The table header's cards before the target's, the same for every file of a product and size."""
    rows = table_rows(product, cadences)
    columns = _columns(product)
    cards = [
        card("XTENSION", "BINTABLE", "marks the beginning of a new HDU"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", _dtype(product).itemsize, "length of first array dimension"),
        card("NAXIS2", rows, "length of second array dimension"),
        card("PCOUNT", 0, "group parameter count (not used)"),
        card("GCOUNT", 1, "group count (not used)"),
        card("TFIELDS", len(columns), "number of table fields"),
    ]
    for index, (name, tform, unit) in enumerate(columns, start=1):
        cards.append(card(f"TTYPE{index}", name, "column title"))
        cards.append(card(f"TFORM{index}", tform, "column format"))
        if unit:
            cards.append(card(f"TUNIT{index}", unit, "column units"))
        if tform == "25E":
            cards.append(card(f"TDIM{index}", "(5,5)", "column dimensions"))
    cards += [
        card("INHERIT", True, "inherit the primary header"),
        card("EXTNAME", _EXTNAME[product], "name of extension"),
        card("EXTVER", 1, "extension version number (not format version)"),
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
    ]
    return tuple(cards)


@lru_cache(maxsize=256)
def _table_cards_tail(product: str, sector: int) -> tuple[bytes, ...]:
    """The table header's cards after the target's: timing, detector and photometry keywords."""
    start, stop = sector_times(sector)
    cards = [
        card("EXPOSURE", round(SECTOR_DAYS * 0.8, 6), "[d] time on source"),
        card("TIMEREF", "SOLARSYSTEM", "barycentric correction applied to times"),
        card("TASSIGN", "SPACECRAFT", "where time is assigned"),
        card("TIMESYS", "TDB", "time system is Barycentric Dynamical Time (TDB)"),
        card("BJDREFI", 2457000, "integer part of BTJD reference date"),
        card("BJDREFF", 0.0, "fraction of the day in BTJD reference date"),
        card("TIMEUNIT", "d", "time unit for TIME, TSTART and TSTOP"),
        card("TELAPSE", round(stop - start, 6), "[d] TSTOP - TSTART"),
        card("LIVETIME", round((stop - start) * 0.8, 6), "[d] TELAPSE multiplied by DEADC"),
        card("TSTART", start, "observation start time in BTJD"),
        card("TSTOP", stop, "observation stop time in BTJD"),
        card("DEADC", 0.792, "deadtime correction"),
        card("TIMEPIXR", 0.5, "bin time beginning=0 middle=0.5 end=1"),
        card("TIERRELA", 5.78e-07, "[d] relative time error"),
        card("INT_TIME", 1.98, "[s] photon accumulation time per frame"),
        card("READTIME", 0.02, "[s] readout time per frame"),
        card("FRAMETIM", 2.0, "[s] frame time (INT_TIME + READTIME)"),
        card("NUM_FRM", 60, "number of frames per time stamp"),
        card("TIMEDEL", CADENCE_DAYS, "[d] time resolution of data"),
    ]
    if product in ("lc", "llc"):
        cards += [card(f"GAIN{c}", 5.2, "[electrons/count] CCD output gain") for c in "ABCD"]
        cards += [card(f"READNOI{c}", 9.5, "[electrons] read noise") for c in "ABCD"]
        cards += [
            card("NREADOUT", 48, "number of read per cadence"),
            card("FXDOFF", 209715200, "compression fixed offset"),
            card("CDPP0_5", 120.5, "RMS CDPP on 0.5-hr time scales"),
            card("CDPP1_0", 95.1, "RMS CDPP on 1.0-hr time scales"),
            card("CDPP2_0", 70.3, "RMS CDPP on 2.0-hr time scales"),
            card("CROWDSAP", 0.99, "Ratio of target flux to total flux in op. ap."),
            card("FLFRCSAP", 0.85, "Frac. of target flux w/in the op. aperture"),
            card("PDCVAR", 0.5, "Target variability"),
            card("PDCMETHD", "msMAP", "PDC algorithm used for target"),
            card("NUMBAND", 3, "Number of scale bands"),
        ]
        for band in (1, 2, 3):
            cards += [
                card(f"FITTYPE{band}", "prior", f"Fit type used for band {band}"),
                card(f"PR_GOOD{band}", 0.9, f"Prior goodness for band {band}"),
                card(f"PR_WGHT{band}", 1.5, f"Prior weight for band {band}"),
            ]
        for key in ("TOT", "COR", "VAR", "NOI", "EPT"):
            cards += [
                card(f"PDC_{key}", 0.9, f"PDC {key.lower()} goodness metric for target"),
                card(f"PDC_{key}P", 50.0, f"PDC {key.lower()} goodness percentile"),
            ]
    return tuple(cards)


def _primary_header(identity: FileIdentity) -> bytes:
    start, stop = sector_times(identity.sector)
    cards = [
        card("SIMPLE", True, "conforms to FITS standards"),
        card("BITPIX", 8, "array data type"),
        card("NAXIS", 0, "number of array dimensions"),
        card("EXTEND", True, "file contains extensions"),
        card("NEXTEND", 2, "number of standard extensions"),
        card("EXTNAME", "PRIMARY", "name of extension"),
        card("EXTVER", 1, "extension version number (not format version)"),
        card("SIMDATA", False, "file is based on simulated data"),
        card("ORIGIN", "NASA/Ames", "institution responsible for creating this file"),
        card("DATE", "2020-09-10", "file creation date."),
        card("TSTART", start, "observation start time in TJD"),
        card("TSTOP", stop, "observation stop time in TJD"),
        card("DATE-OBS", "2018-07-25T19:29:42.708Z", "TSTART as UTC calendar date"),
        card("DATE-END", "2018-08-22T16:14:51.668Z", "TSTOP as UTC calendar date"),
        card("CREATOR", _CREATOR[identity.product], "pipeline job and program used"),
        card("PROCVER", "spoc-5.0.10-20200904", "SW version"),
        card("FILEVER", "1.0", "file format version"),
        card("TIMVERSN", "OGIP/93-003", "OGIP memo number for file format"),
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
        card("DATA_REL", 42, "data release version number"),
        card("OBJECT", f"TIC {identity.tic}", "string version of target id"),
        card("TICID", identity.tic, "unique tess target identifier"),
        card("SECTOR", identity.sector, "Observing sector"),
        card("CAMERA", identity.camera, "Camera number"),
        card("CCD", identity.ccd, "CCD chip number"),
        card("PXTABLE", 129, "pixel table id"),
        card("RADESYS", "ICRS", "reference frame of celestial coordinates"),
        card("RA_OBJ", round(identity.ra, 6), "[deg] right ascension"),
        card("DEC_OBJ", round(identity.dec, 6), "[deg] declination"),
        card("EQUINOX", 2000.0, "equinox of celestial coordinate system"),
        card("PMRA", 0.0, "[mas/yr] RA proper motion"),
        card("PMDEC", 0.0, "[mas/yr] Dec proper motion"),
        card("PMTOTAL", 0.0, "[mas/yr] total proper motion"),
        card("TESSMAG", round(identity.tessmag, 3), "[mag] TESS magnitude"),
        card("TEFF", 5800.0, "[K] Effective temperature"),
        card("LOGG", 4.4, "[cm/s2] log10 surface gravity"),
        card("MH", 0.0, "[log10([M/H])] metallicity"),
        card("RADIUS", 1.0, "[solar radii] stellar radius"),
        card("TICVER", 7, "TICVER"),
        card("CRMITEN", True, "spacecraft cosmic ray mitigation enabled"),
        card("CRBLKSZ", 10, "[exposures] s/c cosmic ray mitigation block siz"),
        card("CRSPOC", False, "SPOC cosmic ray cleaning enabled"),
    ]
    return header_block(cards, 0)


_APERTURE_SIDE = 11


def _aperture(identity: FileIdentity, seed: int) -> tuple[bytes, bytes]:
    """The APERTURE image HDU (header, padded data): a pixel mask derived from the file name."""
    digest = hashlib.blake2b(f"{seed}:{identity.name}".encode(), digest_size=32).digest()
    bits = np.unpackbits(np.frombuffer(digest * 4, dtype=np.uint8))[: _APERTURE_SIDE**2]
    mask = (1 + 2 * bits).astype(">i4").reshape(_APERTURE_SIDE, _APERTURE_SIDE)
    data = _pad(mask.tobytes())
    cards = [
        card("XTENSION", "IMAGE", "marks the beginning of a new HDU"),
        card("BITPIX", 32, "array data type"),
        card("NAXIS", 2, "number of array dimensions"),
        card("NAXIS1", _APERTURE_SIDE, ""),
        card("NAXIS2", _APERTURE_SIDE, ""),
        card("PCOUNT", 0, "number of parameters"),
        card("GCOUNT", 1, "number of groups"),
        card("INHERIT", True, "inherit the primary header"),
        card("EXTNAME", "APERTURE", "name of extension"),
        card("EXTVER", 1, "extension version number (not format version)"),
        card("TELESCOP", "TESS", "telescope"),
        card("INSTRUME", "TESS Photometer", "detector type"),
        card("OBJECT", f"TIC {identity.tic}", "string version of target id"),
        card("TICID", identity.tic, "unique tess target identifier"),
    ]
    return header_block(cards, ones_complement_sum(data)), data


# -- sizes and rendering --------------------------------------------------------------------------
_SAMPLE = FileIdentity("sample", "lc", 1, 1, 1, 1, 0.0, 0.0)


@lru_cache(maxsize=64)
def _fixed_blocks(product: str, cadences: int) -> int:
    """Bytes of everything but the table data: headers are value-independent, so one sample suffices."""
    sample = FileIdentity("sample", product, 1, 1, 1, 1, 0.0, 0.0)
    header_bytes = len(_primary_header(sample)) + len(_table_header(sample, cadences, 0))
    aperture_header, aperture_data = _aperture(sample, 0)
    return header_bytes + len(aperture_header) + len(aperture_data)


def _data_bytes(product: str, cadences: int) -> int:
    raw = table_rows(product, cadences) * _dtype(product).itemsize
    return raw + (-raw % BLOCK)


def file_size(product: str, cadences: int) -> int:
    """Exact size in bytes of any file of this product and cadence count."""
    return _fixed_blocks(product, cadences) + _data_bytes(product, cadences)


@lru_cache(maxsize=1)
def full_cadences() -> int:
    """The cadence count that makes a light curve exactly as big as a real full-sector one."""
    cadences = 20_000
    data_blocks = (FULL_LC_BYTES - _fixed_blocks("lc", cadences)) // BLOCK
    return data_blocks * BLOCK // _dtype("lc").itemsize


def cadences_for(file_size_option: str | int) -> int:
    """'full' (about 20,000 cadences, 2,039,040-byte light curves), 'small' or an explicit count."""
    if isinstance(file_size_option, bool):
        raise ValueError(
            f"file_size {file_size_option!r} is not valid; use 'full', 'small' or a cadence count"
        )
    if isinstance(file_size_option, int):
        if file_size_option < 10:
            raise ValueError(f"file_size {file_size_option} cadences is too few; use at least 10")
        return file_size_option
    if file_size_option == "full":
        return full_cadences()
    if file_size_option == "small":
        return SMALL_CADENCES
    raise ValueError(f"file_size {file_size_option!r} is not valid; use 'full', 'small' or a cadence count")


def render(identity: FileIdentity, *, cadences: int, seed: int) -> list[bytes]:
    """The file's bytes as a list of pieces (join them, or hash/write them one by one)."""
    data, datasum = _table_data(identity.product, cadences, identity.sector, seed)
    aperture_header, aperture_data = _aperture(identity, seed)
    return [
        _primary_header(identity),
        _table_header(identity, cadences, datasum),
        data,
        aperture_header,
        aperture_data,
    ]


def render_bytes(identity: FileIdentity, *, cadences: int, seed: int) -> bytes:
    return b"".join(render(identity, cadences=cadences, seed=seed))


def digest(identity: FileIdentity, *, cadences: int, seed: int) -> tuple[int, str]:
    """(size in bytes, md5 hex) of the file, without joining its pieces."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    for piece in render(identity, cadences=cadences, seed=seed):
        md5.update(piece)
        size += len(piece)
    return size, md5.hexdigest()
