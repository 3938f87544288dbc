"""Synthetic SPOC files: real FITS that astropy opens, with valid checksums and exact, arithmetic sizes."""

from __future__ import annotations

import hashlib
import io
import warnings

import pytest
from astropy.io import fits

from engine.archive import fitsgen

LC_COLUMNS = [
    "TIME", "TIMECORR", "CADENCENO", "SAP_FLUX", "SAP_FLUX_ERR", "SAP_BKG", "SAP_BKG_ERR", "PDCSAP_FLUX",
    "PDCSAP_FLUX_ERR", "QUALITY", "PSF_CENTR1", "PSF_CENTR1_ERR", "PSF_CENTR2", "PSF_CENTR2_ERR",
    "MOM_CENTR1", "MOM_CENTR1_ERR", "MOM_CENTR2", "MOM_CENTR2_ERR", "POS_CORR1", "POS_CORR2",
]  # fmt: skip


def _identity(product: str = "lc", name: str = "tess2018206045859-s0001-0000000261136679-0120-s_lc.fits"):
    return fitsgen.FileIdentity(name, product, 261136679, 1, 4, 2, 84.291188, -80.469119, 5.1)


def _open(body: bytes) -> fits.HDUList:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksum mismatch is only a warning in astropy
        return fits.open(io.BytesIO(body), checksum=True)


def test_light_curve_has_spoc_layout_and_every_checksum_verifies():
    body = fitsgen.render_bytes(_identity(), cadences=50, seed=0)
    with _open(body) as hdus:
        assert [hdu.name for hdu in hdus] == ["PRIMARY", "LIGHTCURVE", "APERTURE"]
        assert [hdu.verify_checksum() for hdu in hdus] == [1, 1, 1]
        assert [hdu.verify_datasum() for hdu in hdus] == [1, 1, 1]
        primary = hdus[0].header
        assert primary["TELESCOP"] == "TESS" and primary["ORIGIN"] == "NASA/Ames"
        assert primary["CREATOR"].endswith("LightCurveExporterPipelineModule")
        assert (primary["TICID"], primary["SECTOR"], primary["CAMERA"], primary["CCD"]) == (
            261136679,
            1,
            4,
            2,
        )
        assert primary["RA_OBJ"] == pytest.approx(84.291188) and primary["DEC_OBJ"] == pytest.approx(
            -80.469119
        )
        table = hdus[1]
        assert table.columns.names == LC_COLUMNS
        assert table.header["NAXIS1"] == 100 and len(table.data) == 50
        assert table.header["OBJECT"] == "TIC 261136679"
        assert (table.data["TIME"][1] - table.data["TIME"][0]) * 1440 == pytest.approx(2.0)
        assert hdus[2].data.shape == (11, 11)


@pytest.mark.parametrize("product", ["tp", "dvt", "llc"])
def test_other_products_are_valid_fits_with_checksums(product):
    body = fitsgen.render_bytes(_identity(product, f"x_{product}.fits"), cadences=120, seed=4)
    with _open(body) as hdus:
        assert len(hdus) == 3
        assert [hdu.verify_checksum() for hdu in hdus] == [1, 1, 1]
        assert len(hdus[1].data) == fitsgen.table_rows(product, 120)


@pytest.mark.parametrize("product", fitsgen.PRODUCTS)
@pytest.mark.parametrize("cadences", [10, 333])
def test_size_is_arithmetic_and_a_whole_number_of_blocks(product, cadences):
    body = fitsgen.render_bytes(_identity(product), cadences=cadences, seed=2)
    assert len(body) == fitsgen.file_size(product, cadences)
    assert len(body) % fitsgen.BLOCK == 0
    assert fitsgen.digest(_identity(product), cadences=cadences, seed=2) == (
        len(body),
        hashlib.md5(body).hexdigest(),
    )


def test_full_light_curve_is_the_size_of_a_real_one():
    cadences = fitsgen.cadences_for("full")
    assert 19_000 < cadences < 21_000
    assert fitsgen.file_size("lc", cadences) == 2_039_040
    size, _md5 = fitsgen.digest(_identity(), cadences=cadences, seed=0)
    assert size == 2_039_040


def test_content_is_a_pure_function_of_seed_and_name():
    a = fitsgen.render_bytes(_identity(), cadences=20, seed=1)
    assert a == fitsgen.render_bytes(_identity(), cadences=20, seed=1)
    assert a != fitsgen.render_bytes(_identity(), cadences=20, seed=2)
    assert a != fitsgen.render_bytes(_identity(name="other_lc.fits"), cadences=20, seed=1)


def test_cards_with_quotes_and_types_read_back():
    header = fits.Header.fromstring(
        b"".join(
            [
                fitsgen.card("A", "it's"),
                fitsgen.card("B", 1.5e-7),
                fitsgen.card("C", True),
                fitsgen.card("D", 7),
            ]
        )
    )
    assert header["A"] == "it's" and header["B"] == pytest.approx(1.5e-7)
    assert header["C"] is True and header["D"] == 7


def test_cadences_for_options():
    assert fitsgen.cadences_for("small") == fitsgen.SMALL_CADENCES
    assert fitsgen.cadences_for(500) == 500
    for bad in ("huge", 3, True):
        with pytest.raises(ValueError, match="file_size"):
            fitsgen.cadences_for(bad)
