"""The archive serves like MAST: redirects to a second host, chunked answers, path URLs, TAP limits."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.parse
from xml.etree import ElementTree

import pytest

from engine.archive import FaultPlan
from engine.archive.catalog import S3_PATH, s3_key

UWS = "{http://www.ivoa.net/xml/UWS/v1.0}"
JOIN_QUERY = (
    "SELECT a.productFileName FROM dbo.caomobservation o JOIN dbo.caomplane p ON p.observationTID = "
    "o.observationTID JOIN dbo.caomartifact a ON a.planeTID = p.planeTID"
)


def request(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """One HTTP exchange without following redirects: (status, headers, body)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def post_form(url: str, fields: dict[str, str]):
    body = urllib.parse.urlencode(fields).encode()
    return request(url, "POST", {"Content-Type": "application/x-www-form-urlencoded"}, body)


def a_file(archive, product: str = "lc"):
    return next(e for e in archive.catalog.values() if e.product == product)


def download_url(archive, entry) -> str:
    return f"{archive.base_url}/api/v0.1/Download/file?uri={entry.uri}"


def test_download_api_redirects_to_a_second_host_that_sends_the_md5_as_etag(archive):
    running = archive(redirect_to_s3=True)
    entry = a_file(running)
    status, headers, _ = request(download_url(running, entry))
    assert status == 302
    location = headers["Location"]
    assert location == f"{running.s3_url}{S3_PATH}{s3_key(entry.path)}"
    assert urllib.parse.urlsplit(location).port != urllib.parse.urlsplit(running.base_url).port
    assert "/stpubdata/tess/public/tid/s0001/" in location
    status, headers, body = request(location)
    assert status == 200 and headers["ETag"] == f'"{entry.md5}"'
    assert int(headers["Content-Length"]) == entry.size == len(body)
    assert hashlib.md5(body).hexdigest() == entry.md5
    hosts = [(r.host, r.status) for r in running.request_log]
    assert hosts == [("api", 302), ("s3", 200)]


def test_second_host_honours_range_and_if_range_with_its_etag(archive):
    running = archive(redirect_to_s3=True)
    entry = a_file(running)
    location = request(download_url(running, entry))[1]["Location"]
    whole = request(location)[2]
    status, headers, body = request(location, headers={"Range": "bytes=100-", "If-Range": f'"{entry.md5}"'})
    assert status == 206 and body == whole[100:]
    assert headers["Content-Range"] == f"bytes 100-{entry.size - 1}/{entry.size}"
    status, _, body = request(location, headers={"Range": "bytes=100-", "If-Range": '"0123stale"'})
    assert status == 200 and body == whole  # a stale validator: the whole file again


def test_ffi_keys_on_the_second_host_follow_the_cloud_layout(archive):
    running = archive(redirect_to_s3=True, ffi_files=True, exposures_per_ccd=3)
    entry = a_file(running, "ffic")
    location = request(download_url(running, entry))[1]["Location"]
    assert "/stpubdata/tess/public/ffi/s0001/2018/" in location and location.endswith("/" + entry.name)
    status, headers, body = request(location)
    assert status == 200 and hashlib.md5(body).hexdigest() == entry.md5 == headers["ETag"].strip('"')


def test_status_faults_strike_at_the_api_and_body_faults_at_the_second_host(archive):
    running = archive(redirect_to_s3=True)
    # Swapped before the first request, so the archive's loop never sees a half-made change.
    running.faults = FaultPlan.from_spec("503=1:attempts=1,wrong=1:attempts=1")
    entry = a_file(running)
    status, headers, _ = request(download_url(running, entry))
    assert status == 503 and "Retry-After" in headers
    status, headers, _ = request(download_url(running, entry))
    assert status == 302
    status, _, body = request(headers["Location"])
    assert status == 200 and len(body) == entry.size and hashlib.md5(body).hexdigest() != entry.md5
    status, _, body = request(headers["Location"])
    assert hashlib.md5(body).hexdigest() == entry.md5  # second GET on that host: clean
    assert [(r.host, r.status, r.fault) for r in running.request_log] == [
        ("api", 503, "503"),
        ("api", 302, ""),
        ("s3", 200, "wrong"),
        ("s3", 200, ""),
    ]


def test_chunked_answers_have_no_content_length_and_the_whole_file(archive):
    running = archive(chunked_fraction=1.0)
    entry = a_file(running)
    status, headers, body = request(download_url(running, entry))
    assert status == 200 and "Content-Length" not in headers
    assert headers["Transfer-Encoding"] == "chunked"
    assert hashlib.md5(body).hexdigest() == entry.md5


def test_chunked_fraction_picks_files_by_seed_and_name(archive):
    running = archive(chunked_fraction=0.5, targets=40)
    files = running.catalog
    picked = [e for e in files.values() if e.product == "lc" and running._files.chunked(e)]
    lcs = [e for e in files.values() if e.product == "lc"]
    assert 0 < len(picked) < len(lcs)
    for entry in lcs[:6]:
        _, headers, _ = request(download_url(running, entry))
        assert ("Content-Length" not in headers) == (entry in picked)


def test_path_urls_are_served_directly(archive):
    running = archive(url_form="path")
    entry = a_file(running)
    status, _, body = request(f"{running.base_url}/files/{entry.path}")
    assert status == 200 and hashlib.md5(body).hexdigest() == entry.md5
    assert request(f"{running.base_url}/files/tess/tid/s0001/nothing_lc.fits")[0] == 404


def test_capabilities_declare_maxrec_default_and_hard_limit_of_100000(archive):
    running = archive()
    status, _, body = request(running.tap_url + "/capabilities")
    assert status == 200
    limit = next(e for e in ElementTree.fromstring(body).iter() if e.tag.endswith("outputLimit"))
    assert {child.tag: child.text for child in limit} == {"default": "100000", "hard": "100000"}


def test_a_slow_join_answers_504_on_sync_after_the_gateway_timeout(archive):
    running = archive(sync_timeout=0.5, slow_join=30.0)
    status, _, body = post_form(running.tap_url + "/sync", {"LANG": "ADQL", "QUERY": JOIN_QUERY})
    assert status == 504 and b"Gateway Time-out" in body
    quick = "SELECT TOP 3 obs_id FROM ivoa.obscore"
    status, _, body = post_form(running.tap_url + "/sync", {"LANG": "ADQL", "QUERY": quick})
    assert status == 200 and b"obs_id" in body


def test_an_async_job_running_too_long_ends_in_error_saying_why(archive):
    running = archive(async_abort_after=0.5, slow_join=30.0)
    status, headers, _ = post_form(
        running.tap_url + "/async", {"LANG": "ADQL", "QUERY": JOIN_QUERY, "PHASE": "RUN"}
    )
    assert status == 303
    job_url = headers["Location"]
    deadline = time.monotonic() + 60
    phase = ""
    while time.monotonic() < deadline:
        document = ElementTree.fromstring(request(job_url + "?WAIT=5")[2])
        phase = document.find(f"{UWS}phase").text
        if phase not in ("PENDING", "QUEUED", "EXECUTING"):
            break
    assert phase == "ERROR"
    message = document.find(f"{UWS}errorSummary/{UWS}message").text
    assert "0.5 s" in message and "aborted" in message
    assert document.find(f"{UWS}executionDuration").text == "1"


def test_archive_options_reject_bad_limits(archive):
    with pytest.raises(ValueError, match="sync_timeout"):
        archive(sync_timeout=0)
    with pytest.raises(ValueError, match="chunked_fraction"):
        archive(chunked_fraction=2.0)


def test_head_on_the_second_host_gives_the_validators_without_a_body(archive):
    running = archive(redirect_to_s3=True)
    entry = a_file(running)
    location = request(download_url(running, entry), "HEAD")[1]["Location"]
    status, headers, body = request(location, "HEAD")
    assert status == 200 and body == b""
    assert headers["ETag"] == f'"{entry.md5}"' and int(headers["Content-Length"]) == entry.size
    assert headers["Accept-Ranges"] == "bytes"


def test_hostile_names_as_path_urls_stay_one_path_segment_and_are_served(archive):
    running = archive(url_form="path", hostile_names=True)
    table = running.catalog.tables["ivoa.obscore"]
    index = [name for name, _ in table.columns].index("access_url")
    urls = {str(row[index]) for row in table.rows if row[index]}
    hostile = [e for e in running.catalog.values() if e.identity.name.startswith("hostile-")]
    assert hostile
    for entry in hostile:
        url = f"{running.base_url}/files/{entry.path}"
        assert urllib.parse.unquote(url.rsplit("/", 1)[-1]) == entry.name  # one segment, decoded
        assert url in urls  # the table's access_url is this path URL
        if "\x00" not in urllib.parse.unquote(entry.path):
            status, _, body = request(url)
            assert status == 200 and hashlib.md5(body).hexdigest() == entry.md5


def test_examples_document_is_declared_and_its_queries_run(archive):
    running = archive(focus=(1, 1, 2))
    capabilities = request(running.tap_url + "/capabilities")[2].decode()
    assert 'standardID="ivo://ivoa.net/std/DALI#examples"' in capabilities
    status, headers, body = request(running.tap_url + "/examples")
    assert status == 200 and headers["Content-Type"].startswith("application/xhtml+xml")
    document = ElementTree.fromstring(body)
    queries = [e.text for e in document.iter() if e.get("property") == "query"]
    assert len(queries) == 2
    for query in queries:
        status, _, result = post_form(running.tap_url + "/sync", {"LANG": "ADQL", "QUERY": query})
        assert status == 200 and b"<TR>" in result  # each example finds rows
