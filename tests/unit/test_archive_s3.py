"""The archive's S3-shaped host (`s3=True`): its own port without redirects, S3's XML errors for keys
left out, multipart-style ETags, the slowdown fault, and MAST's path_lookup on the API host."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse

import pytest

from engine.archive import FaultPlan
from engine.archive.catalog import S3_PATH, s3_key
from engine.archive.cli_options import add_archive_arguments, archive_options_from_args
from engine.exceptions import ConfigError
from tests.unit.test_archive_mast_service import a_file, download_url, request


def object_url(archive, entry) -> str:
    return f"{archive.s3_url}{S3_PATH}{s3_key(entry.path)}"


def lookup(archive, *uris: str):
    query = urllib.parse.urlencode([*(("uri", u) for u in uris), ("use_cloud_path", "True")])
    return request(f"{archive.base_url}/api/v0.1/path_lookup/?{query}")


def test_s3_serves_the_bucket_on_its_own_port_while_the_api_serves_files_directly(archive):
    running = archive(s3=True)
    entry = a_file(running)
    assert running.s3_url and running.s3_url != running.base_url
    status, headers, body = request(object_url(running, entry))
    assert (
        status == 200 and headers["ETag"] == f'"{entry.md5}"' and hashlib.md5(body).hexdigest() == entry.md5
    )
    status, _, body = request(download_url(running, entry))  # no redirect without redirect_to_s3
    assert status == 200 and hashlib.md5(body).hexdigest() == entry.md5


@pytest.mark.parametrize(("error", "status"), [("NoSuchKey", 404), ("AccessDenied", 403)])
def test_keys_left_out_of_the_bucket_answer_s3s_xml_error_and_the_api_still_serves_them(
    archive, error, status
):
    probe = archive()
    entry = a_file(probe)
    running = archive(s3=True, redirect_to_s3=True, s3_missing_names=(entry.name,), s3_missing_error=error)
    answer, headers, body = request(object_url(running, entry))
    assert answer == status and headers["Content-Type"].startswith("application/xml")
    assert re.search(rb"<Code>" + error.encode() + rb"</Code>", body)
    served, _, data = request(download_url(running, entry))  # not redirected to a key that is not there
    assert served == 200 and hashlib.md5(data).hexdigest() == entry.md5
    assert [(r.host, r.status) for r in running.request_log] == [("s3", status), ("api", 200)]


def test_a_missing_fraction_leaves_about_that_share_out_deterministically(archive):
    running = archive(s3=True, s3_missing_fraction=0.5)
    entries = list(running.catalog.values())[:60]
    statuses = [request(object_url(running, e), method="HEAD")[0] for e in entries]
    assert 10 < statuses.count(404) < 50 and set(statuses) == {200, 404}
    again = archive(s3=True, s3_missing_fraction=0.5)
    assert statuses == [request(object_url(again, e), method="HEAD")[0] for e in entries]


def test_multipart_objects_carry_an_etag_that_is_not_their_md5(archive):
    running = archive(s3=True, s3_multipart_fraction=1.0)
    entry = a_file(running)
    status, headers, body = request(object_url(running, entry))
    assert status == 200 and hashlib.md5(body).hexdigest() == entry.md5
    assert re.fullmatch(r'"[0-9a-f]{32}-\d+"', headers["ETag"]) and entry.md5 not in headers["ETag"]
    etag = headers["ETag"]
    status, _, tail = request(object_url(running, entry), headers={"Range": "bytes=100-", "If-Range": etag})
    assert status == 206 and tail == body[100:]


def test_slowdown_is_a_503_with_s3s_code_on_the_bucket_only(archive):
    running = archive(s3=True, faults=FaultPlan.from_spec("slowdown=1:attempts=1"))
    entry = a_file(running)
    status, _, body = request(object_url(running, entry))
    assert status == 503 and b"<Code>SlowDown</Code>" in body
    assert request(object_url(running, entry))[0] == 200  # the second attempt is served
    assert request(download_url(running, entry))[0] == 200  # never on the API host


def test_path_lookup_maps_uris_to_cloud_paths_and_null_for_files_not_in_the_bucket(archive):
    probe = archive()
    first, second = list(probe.catalog.values())[:2]
    running = archive(s3=True, s3_missing_names=(second.name,))
    status, _, body = lookup(running, first.uri, second.uri, "mast:TESS/product/nothing.fits")
    assert status == 200
    answer = json.loads(body)
    assert answer[first.uri]["path"] == "/" + s3_key(first.path)
    assert answer[second.uri]["path"] is None and answer["mast:TESS/product/nothing.fits"]["path"] is None


def test_without_path_lookup_the_api_answers_404_as_other_archives_do(archive):
    running = archive(s3=True, path_lookup=False)
    assert lookup(running, a_file(running).uri)[0] == 404
    assert lookup(archive(redirect_to_s3=True), a_file(running).uri)[0] == 404  # only with s3


def test_the_cli_flags_set_the_s3_knobs_and_refuse_a_bad_fraction():
    import argparse

    parser = argparse.ArgumentParser()
    add_archive_arguments(parser)
    ns = parser.parse_args(
        ["--s3", "--s3-multipart", "0.2", "--s3-missing", "0.1", "--s3-missing-names", "a.fits, b.fits",
         "--s3-missing-error", "AccessDenied", "--no-path-lookup"]
    )  # fmt: skip
    options = archive_options_from_args(ns)
    assert options.s3 and options.s3_multipart_fraction == 0.2 and options.s3_missing_fraction == 0.1
    assert options.s3_missing_names == ("a.fits", "b.fits") and options.s3_missing_error == "AccessDenied"
    assert options.path_lookup is False
    with pytest.raises(ConfigError, match="--s3-missing: 2 is out of range"):
        parser.parse_args(["--s3-missing", "2"])
    with pytest.raises(ConfigError):
        archive_options_from_args(parser.parse_args([]), s3_multipart_fraction=3.0)
