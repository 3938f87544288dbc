"""StreamCheck (size/md5/sniff while streaming), verify_fits and check_file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from engine.exceptions import ChecksumMismatchError, NotFitsError, SizeMismatchError
from engine.models import PlanItem, VerifyLevel
from engine.verify import StreamCheck, check_file, verify_fits
from engine.verify.fits import FITS_BLOCK
from engine.verify.stream import estimate_ceiling


def make_fits(rows: int = 500) -> bytes:
    primary = fits.PrimaryHDU()
    table = fits.BinTableHDU.from_columns(
        [fits.Column(name="FLUX", format="E", array=np.linspace(0.0, 1.0, rows))], name="LIGHTCURVE"
    )
    aperture = fits.ImageHDU(np.arange(121, dtype=np.int32).reshape(11, 11), name="APERTURE")
    buffer = io.BytesIO()
    fits.HDUList([primary, table, aperture]).writeto(buffer, checksum=True)
    return buffer.getvalue()


GOOD = make_fits()
GOOD_MD5 = hashlib.md5(GOOD).hexdigest()


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def item(**fields: object) -> PlanItem:
    return PlanItem(url="http://127.0.0.1/x_lc.fits", filename="x_lc.fits", **fields)  # type: ignore[arg-type]


def stream(check: StreamCheck, data: bytes, piece: int = 1000) -> tuple[int, str]:
    for start in range(0, len(data), piece):
        check.feed(data[start : start + piece])
    return check.finish()


# -- StreamCheck -------------------------------------------------------------------------------------
def test_stream_check_counts_and_hashes_in_pieces() -> None:
    check = StreamCheck(item(size=len(GOOD), md5=GOOD_MD5), VerifyLevel.FITS)
    assert stream(check, GOOD, piece=7) == (len(GOOD), GOOD_MD5)
    assert check.checksum_declared


def test_stream_check_refuses_html_on_the_first_bytes() -> None:
    check = StreamCheck(item(), VerifyLevel.SIZE)  # the sniff runs at every level
    with pytest.raises(NotFitsError, match="web page"):
        check.feed(b"  <html><head><title>503</title>")


def test_stream_check_refuses_json_and_wrong_signature() -> None:
    with pytest.raises(NotFitsError, match="web page or JSON"):
        StreamCheck(item(), VerifyLevel.FITS).feed(b'{"error": "no such file"}')
    with pytest.raises(NotFitsError, match="not b'SIMPLE  ='"):
        StreamCheck(item(), VerifyLevel.FITS).feed(b"XTENSION= 'BINTABLE'")


def test_stream_check_waits_for_enough_bytes_to_sniff() -> None:
    check = StreamCheck(item(), VerifyLevel.FITS)
    check.feed(b"SIMP")
    assert not check.sniffed
    check.feed(b"LE  =                    T")
    assert check.sniffed


def test_stream_check_refuses_an_empty_body() -> None:
    with pytest.raises(NotFitsError, match="empty body"):
        StreamCheck(item(), VerifyLevel.SIZE).finish()


def test_pdf_products_are_sniffed_for_their_own_signature() -> None:
    pdf = PlanItem(url="http://127.0.0.1/x_dvr.pdf", filename="x_dvr.pdf")
    check = StreamCheck(pdf, VerifyLevel.FITS)
    check.feed(b"%PDF-1.7\n" + b"x" * 100)
    assert check.finish() == (109, hashlib.md5(b"%PDF-1.7\n" + b"x" * 100).hexdigest())  # no FITS rules
    with pytest.raises(NotFitsError):
        StreamCheck(pdf, VerifyLevel.SIZE).feed(b"SIMPLE  =")


def test_stream_check_caps_the_body_at_the_declared_size() -> None:
    check = StreamCheck(item(size=len(GOOD)), VerifyLevel.FITS)
    check.feed(GOOD)
    with pytest.raises(SizeMismatchError, match=f"runs past {len(GOOD)} bytes"):
        check.feed(b"\0")


def test_stream_check_caps_at_the_announced_length_when_nothing_is_declared() -> None:
    check = StreamCheck(item(), VerifyLevel.FITS)
    check.expect_total(2880)
    with pytest.raises(SizeMismatchError, match="runs past 2880"):
        check.feed(GOOD[:2881])


def test_stream_check_short_body_and_wrong_md5() -> None:
    short = StreamCheck(item(size=len(GOOD)), VerifyLevel.CHECKSUM)
    short.feed(GOOD[:-2880])
    with pytest.raises(SizeMismatchError, match=f"but the archive declares {len(GOOD)}"):
        short.finish()
    wrong = StreamCheck(item(size=len(GOOD), md5="f" * 32), VerifyLevel.CHECKSUM)
    wrong.feed(GOOD)
    with pytest.raises(ChecksumMismatchError, match=GOOD_MD5):
        wrong.finish()


def test_undeclared_md5_is_not_pretended() -> None:
    check = StreamCheck(item(size=len(GOOD)), VerifyLevel.CHECKSUM)
    assert stream(check, GOOD) == (len(GOOD), GOOD_MD5)
    assert not check.checksum_declared


def test_estimate_ceiling_is_twice_the_estimate_or_one_mib_more() -> None:
    assert estimate_ceiling(1991) == 2 * 1991 * 1024  # large files: twice the estimate
    assert estimate_ceiling(53) == 53 * 1024 + 1024 * 1024  # small ones: the estimate plus 1 MiB
    assert estimate_ceiling(0) == 1024 * 1024
    assert estimate_ceiling(1024) == 2 * 1024 * 1024  # where the two meet


def test_body_within_the_estimate_ceiling_but_off_the_estimate_is_kept_with_a_flag() -> None:
    # 1,000,000 bytes against an estimate of 1991 kB: far off, still under the ceiling. It was the
    # reason to reject a good file; now it only asks for a warning.
    small = StreamCheck(item(est_kb=1991), VerifyLevel.SIZE, est_tolerance=0.05)
    small.feed(b"SIMPLE  =" + b"\0" * 999_991)
    assert small.finish()[0] == 1_000_000
    assert small.off_estimate


def test_body_close_to_the_estimate_raises_no_flag() -> None:
    # 2,039,040 bytes is 1991.25 KiB; an estimate of 1991 kB is within the rounding slack.
    exact = 2_039_040
    ok = StreamCheck(item(est_kb=1991), VerifyLevel.SIZE, est_tolerance=0.0)
    ok.feed(b"SIMPLE  =" + b"\0" * (exact - 9))
    assert ok.finish()[0] == exact
    assert not ok.off_estimate


def test_body_past_the_estimate_ceiling_is_cut_while_streaming() -> None:
    far = StreamCheck(item(est_kb=1000), VerifyLevel.SIZE, est_tolerance=0.05)
    assert far.limit == estimate_ceiling(1000)
    with pytest.raises(SizeMismatchError, match=f"runs past {estimate_ceiling(1000)} bytes"):
        far.feed(b"SIMPLE  =" + b"\0" * (estimate_ceiling(1000) - 8))


def test_content_length_above_the_estimate_ceiling_is_refused_before_the_body() -> None:
    check = StreamCheck(item(est_kb=53), VerifyLevel.FITS)
    with pytest.raises(SizeMismatchError, match=r"announces 31457280 bytes, more than .* estimate of 53 kB"):
        check.expect_total(31_457_280)
    assert check.nbytes == 0


def test_content_length_lowers_the_cap_but_never_raises_it() -> None:
    check = StreamCheck(item(est_kb=53), VerifyLevel.FITS)
    check.expect_total(40_000)
    assert check.limit == 40_000
    undeclared = StreamCheck(item(), VerifyLevel.FITS, max_file_size=10_000)
    with pytest.raises(SizeMismatchError, match=r"more than the 10000 bytes fetch\.max_file_size allows"):
        undeclared.expect_total(10_001)


def test_a_row_without_any_size_is_capped_by_max_file_size() -> None:
    check = StreamCheck(item(), VerifyLevel.SIZE, max_file_size=5760)
    assert check.limit == 5760
    check.feed(b"SIMPLE  =" + b"\0" * 5751)
    with pytest.raises(
        SizeMismatchError, match=r"runs past 5760 bytes, the most fetch\.max_file_size allows"
    ):
        check.feed(b"\0")
    assert StreamCheck(item(), VerifyLevel.SIZE).limit == 4 * 1024**3  # the documented default


def test_exact_size_stays_the_cap_whatever_the_estimate() -> None:
    check = StreamCheck(item(size=2880, est_kb=5000), VerifyLevel.SIZE, max_file_size=100)
    assert check.limit == 2880


def test_check_file_refuses_only_past_the_estimate_ceiling(tmp_path: Path) -> None:
    from engine.verify.stream import check_size

    check_size("x", 1_000_000, total=None, item=item(est_kb=1991), tolerance=0.0)
    with pytest.raises(SizeMismatchError, match="the archive's estimate of 10 kB allows"):
        check_size("x", estimate_ceiling(10) + 1, total=None, item=item(est_kb=10))


def test_truncated_fits_is_refused_only_at_fits_level() -> None:
    truncated = GOOD[:5000]
    with pytest.raises(NotFitsError, match="not a whole number of 2880-byte FITS blocks"):
        stream(StreamCheck(item(), VerifyLevel.FITS), truncated)
    assert stream(StreamCheck(item(), VerifyLevel.CHECKSUM), truncated)[0] == 5000


def test_reset_starts_the_hash_over() -> None:
    check = StreamCheck(item(md5=GOOD_MD5), VerifyLevel.CHECKSUM)
    check.feed(b"SIMPLE  = garbage that will be thrown away")
    check.reset()
    assert stream(check, GOOD) == (len(GOOD), GOOD_MD5)


# -- verify_fits / check_file --------------------------------------------------------------------------
def test_verify_fits_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good_lc.fits"
    path.write_bytes(GOOD)
    verify_fits(path)


def test_verify_fits_names_the_hdu_with_a_bad_checksum(tmp_path: Path) -> None:
    path = tmp_path / "bad_lc.fits"
    path.write_bytes(flip(GOOD, len(GOOD) - 100))  # inside the APERTURE image's data
    with pytest.raises(NotFitsError, match=r"HDU 2 \(APERTURE\) fails its CHECKSUM"):
        verify_fits(path)


def test_verify_fits_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk_lc.fits"
    path.write_bytes(b"SIMPLE  = this is not a header" + b" " * 2850)
    with pytest.raises(NotFitsError, match=r"junk_lc\.fits"):
        verify_fits(path)


def test_check_file_levels(tmp_path: Path) -> None:
    path = tmp_path / "f_lc.fits"
    path.write_bytes(GOOD)
    assert check_file(path, size=len(GOOD), md5=GOOD_MD5, level=VerifyLevel.FITS) == GOOD_MD5
    assert check_file(path, size=-1, md5="", level=VerifyLevel.CHECKSUM) == GOOD_MD5
    assert check_file(path, size=len(GOOD), md5="f" * 32, level=VerifyLevel.SIZE) == ""


def test_check_file_failures(tmp_path: Path) -> None:
    path = tmp_path / "f_lc.fits"
    with pytest.raises(FileNotFoundError):
        check_file(path, size=-1, md5="", level=VerifyLevel.SIZE)
    path.write_bytes(GOOD)
    with pytest.raises(SizeMismatchError):
        check_file(path, size=len(GOOD) + 1, md5="", level=VerifyLevel.SIZE)
    with pytest.raises(ChecksumMismatchError, match=GOOD_MD5):
        check_file(path, size=len(GOOD), md5="0" * 32, level=VerifyLevel.CHECKSUM)
    path.write_bytes(flip(GOOD, len(GOOD) - 100))
    with pytest.raises(NotFitsError, match="CHECKSUM"):
        check_file(path, size=len(GOOD), md5="", level=VerifyLevel.FITS)
    path.write_bytes(GOOD[:2881])
    with pytest.raises(NotFitsError, match="truncated"):
        check_file(path, size=-1, md5="", level=VerifyLevel.FITS)
    path.write_bytes(b"<html>oops</html>")
    with pytest.raises(NotFitsError, match="web page"):
        check_file(path, size=-1, md5="", level=VerifyLevel.SIZE)


# -- verify_fits: raw-byte checksums and the file's extent ---------------------------------------------
def _hdu_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(header start, data start, end) of every HDU, as astropy reads them."""
    with fits.open(io.BytesIO(data)) as hdul:
        infos = [hdu.fileinfo() for hdu in hdul]
    return [(i["hdrLoc"], i["datLoc"], i["datLoc"] + i["datSpan"]) for i in infos]


def test_ones_complement_sum_matches_the_standard() -> None:
    from engine.verify.fits import ones_complement_sum

    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 4 * 1000, dtype=np.uint8).tobytes()
    expected = 0
    for offset in range(0, len(data), 4):  # the FITS standard's definition, word by word
        expected += int.from_bytes(data[offset : offset + 4], "big")
        expected = (expected & 0xFFFFFFFF) + (expected >> 32)
    assert ones_complement_sum(data) == expected
    for start, _data_start, end in _hdu_spans(GOOD):  # a right CHECKSUM makes the HDU sum to -0
        assert ones_complement_sum(GOOD[start:end]) == 0xFFFFFFFF


def test_a_flip_astropy_would_miss_is_caught(tmp_path: Path) -> None:
    """A byte after END in a header is not in astropy's re-serialised header; the raw sum sees it."""
    _start, data_start, _end = _hdu_spans(GOOD)[0]
    end_card = GOOD.index(b"END" + b" " * 77)
    assert end_card + 80 < data_start  # there is blank space after END in the primary header
    damaged = flip(GOOD, data_start - 40)
    with fits.open(io.BytesIO(damaged)) as hdul:
        assert hdul[0].verify_checksum() == 1  # astropy itself calls it good
    path = tmp_path / "padding_lc.fits"
    path.write_bytes(damaged)
    with pytest.raises(NotFitsError, match=r"HDU 0 \(PRIMARY\) fails its CHECKSUM"):
        verify_fits(path)


@pytest.mark.filterwarnings("ignore:File may have been truncated", "ignore:Unexpected extra padding")
def test_whole_blocks_missing_or_extra_are_refused(tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "cut_lc.fits"
    path.write_bytes(GOOD[:-FITS_BLOCK])  # still whole blocks: only the HDU layout shows the cut
    with pytest.raises(NotFitsError, match=r"HDU 2 \(APERTURE\) needs \d+ bytes but the file has \d+"):
        verify_fits(path)
    path.write_bytes(GOOD + b"\0" * FITS_BLOCK)  # astropy only warns about this
    with pytest.raises(NotFitsError, match=f"{FITS_BLOCK} bytes follow the last HDU"):
        verify_fits(path)
    with warnings.catch_warnings():  # an application that turned warnings into errors gets the same
        warnings.simplefilter("error")
        with pytest.raises(NotFitsError):
            verify_fits(path)


def test_a_datasum_without_checksum_is_verified(tmp_path: Path) -> None:
    table = fits.BinTableHDU.from_columns([fits.Column(name="F", format="E", array=np.arange(900.0))])
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer, checksum="datasum")
    data = buffer.getvalue()
    assert b"CHECKSUM=" not in data and b"DATASUM =" in data
    path = tmp_path / "datasum_lc.fits"
    path.write_bytes(data)
    verify_fits(path)
    _start, data_start, _end = _hdu_spans(data)[1]
    path.write_bytes(flip(data, data_start + 100))
    with pytest.raises(NotFitsError, match=r"HDU 1 .* fails its DATASUM"):
        verify_fits(path)


def test_an_unchecksummed_hdu_must_still_parse(tmp_path: Path) -> None:
    table = fits.BinTableHDU.from_columns([fits.Column(name="F", format="E", array=np.arange(10.0))])
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer)
    data = buffer.getvalue().replace(b"TFORM1  = 'E       '", b"TFORM1  = 'Q!      '")  # no such format
    assert b"'Q!      '" in data
    path = tmp_path / "bad_tform_lc.fits"
    path.write_bytes(data)
    with pytest.raises(NotFitsError, match="not a readable FITS file"):
        verify_fits(path)


def test_an_empty_or_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty_lc.fits"
    path.write_bytes(b"")
    with pytest.raises(NotFitsError, match="empty"):
        verify_fits(path)
    path.write_bytes(b"%PDF-1.7" + b" " * (FITS_BLOCK - 8))
    with pytest.raises(NotFitsError, match="not a FITS file"):
        verify_fits(path)
    with pytest.raises(FileNotFoundError):
        verify_fits(tmp_path / "gone_lc.fits")
