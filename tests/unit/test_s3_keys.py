"""The bucket's key layout, the ETag rule and path_lookup's answers, without a network."""

from __future__ import annotations

import pytest

from engine.archive.catalog import dvt_name, ffi_path, lc_obs_id, s3_key, tid_path
from engine.fetch.s3 import (
    bucket_base,
    data_uri,
    etag_md5,
    key_for_name,
    normalise_cloud_path,
    object_key,
)
from engine.models import PlanItem
from engine.settings import S3_ENDPOINT

LC = "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits"


def test_a_light_curve_lives_under_its_sector_and_the_tic_split_in_four() -> None:
    assert key_for_name(LC) == f"tess/public/tid/s0001/0000/0000/2515/5310/{LC}"


def test_a_target_pixel_file_and_a_fast_cadence_file_share_the_light_curves_tree() -> None:
    tp = LC.replace("_lc.fits", "_tp.fits")
    fast = LC.replace("_lc.fits", "_fast-lc.fits")
    assert key_for_name(tp) == f"tess/public/tid/s0001/0000/0000/2515/5310/{tp}"
    assert key_for_name(fast) == f"tess/public/tid/s0001/0000/0000/2515/5310/{fast}"


def test_the_mast_facts_example_key_is_reproduced() -> None:
    name = "tess2019226182529-s0015-0000000375422201-0151-s_lc.fits"
    assert key_for_name(name) == f"tess/public/tid/s0015/0000/0003/7542/2201/{name}"


def test_a_dv_file_spanning_sectors_lives_under_the_last_sector() -> None:
    name = "tess2018206190142-s0001-s0013-0000000025155310-00106_dvt.fits"
    assert key_for_name(name) == f"tess/public/tid/s0013/0000/0000/2515/5310/{name}"
    report = "tess2018206190142-s0001-s0013-0000000025155310-01-00106_dvs.pdf"
    assert key_for_name(report) == f"tess/public/tid/s0013/0000/0000/2515/5310/{report}"


def test_an_ffi_lives_under_the_year_and_day_of_its_timestamp_and_its_camera_ccd() -> None:
    name = "tess2018207052942-s0001-1-2-0120-s_ffic.fits"
    assert key_for_name(name) == f"tess/public/ffi/s0001/2018/207/1-2/{name}"
    raw = name.replace("_ffic", "_ffir")
    assert key_for_name(raw) == f"tess/public/ffi/s0001/2018/207/1-2/{raw}"


@pytest.mark.parametrize(
    "name",
    [
        "hlsp_qlp_tess_ffi_s0001-0000000025155310_tess_v01_llc.fits",  # HLSPs are not in the bucket
        "../../etc/passwd",
        "tess2018206045859-s0001-0000000025155310-0120-s_lc.fits/../x",
        "tess2018206045859-s0001-00000000251553100-0120-s_lc.fits",  # 17 digits
        "",
    ],
)
def test_names_outside_the_layout_have_no_key(name: str) -> None:
    assert key_for_name(name) is None


def test_keys_agree_with_the_local_archives_own_mapping() -> None:
    tic, sector = 25155310, 1
    for name in (f"{lc_obs_id(sector, tic)}_lc.fits", dvt_name(sector, tic)):
        assert key_for_name(name) == s3_key(tid_path(sector, tic, name))
    ffi = "tess2018207052942-s0001-1-2-0120-s_ffic.fits"
    assert key_for_name(ffi) == s3_key(ffi_path(1, 1, 2, "2018207052942", ffi))


def test_the_key_comes_from_the_data_uri_when_the_row_has_no_file_name() -> None:
    item = PlanItem(
        url=f"https://mast.stsci.edu/api/v0.1/Download/file?uri=mast:TESS/product/{LC}", filename=""
    )
    assert object_key(item) == key_for_name(LC)
    assert data_uri(item) == f"mast:TESS/product/{LC}"


def test_an_s3_url_names_its_key_and_a_traversal_is_refused() -> None:
    key = f"tess/public/tid/s0001/0000/0000/2515/5310/{LC}"
    assert object_key(PlanItem(url=f"s3://stpubdata/{key}", filename=LC)) == key
    assert object_key(PlanItem(url="s3://stpubdata/tess/../../x", filename="x")) is None
    assert object_key(PlanItem(url=f"s3://otherbucket/{key}", filename=LC)) is None


@pytest.mark.parametrize(
    ("etag", "md5"),
    [
        ('"0123456789abcdef0123456789abcdef"', "0123456789abcdef0123456789abcdef"),
        ('"0123456789ABCDEF0123456789ABCDEF"', "0123456789abcdef0123456789abcdef"),
        ('"0123456789abcdef0123456789abcdef-3"', ""),  # multipart: not an md5
        ('W/"0123456789abcdef0123456789abcdef"', ""),  # weak
        ('"0123456789abcdef0123456789abcde"', ""),  # 31 digits
        ('"0123456789abcdef0123456789abcdeg"', ""),  # not hex
        ('"18a6c2b1e-1f00"', ""),  # aiohttp's own mtime-size tag
        (None, ""),
    ],
)
def test_an_etag_is_an_md5_only_when_exactly_32_hex_digits_without_a_dash(etag: str | None, md5: str) -> None:
    assert etag_md5(etag) == md5


def test_the_default_endpoint_is_virtual_hosted_and_others_path_style() -> None:
    assert bucket_base(S3_ENDPOINT) == S3_ENDPOINT  # the bucket's own host: virtual-hosted
    assert bucket_base("http://127.0.0.1:9000") == "http://127.0.0.1:9000/stpubdata"
    assert bucket_base("http://127.0.0.1:9000/") == "http://127.0.0.1:9000/stpubdata"
    assert bucket_base("http://127.0.0.1:9000/stpubdata") == "http://127.0.0.1:9000/stpubdata"


@pytest.mark.parametrize(
    "written",
    [
        "tess/public/tid/s0001/x_lc.fits",
        "/tess/public/tid/s0001/x_lc.fits",
        "s3://stpubdata/tess/public/tid/s0001/x_lc.fits",
        "/stpubdata/tess/public/tid/s0001/x_lc.fits",
    ],
)
def test_path_lookup_paths_in_any_of_their_forms_are_compared_as_bare_keys(written: str) -> None:
    assert normalise_cloud_path(written) == "tess/public/tid/s0001/x_lc.fits"
