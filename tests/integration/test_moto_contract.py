"""The S3 source against a real S3 implementation: moto's server mode on 127.0.0.1.

The objects (FITS bytes made by engine.archive) are put with a public-read ACL (boto3 signs the
setup only), then a real `tessmirror fetch` with ``[fetch] source = "s3"`` reads them anonymously:
every GET without credentials, a part left by an earlier run resumed with Range + If-Range, an
object uploaded in parts (its ETag ``<hex>-1`` is no md5 and is not used as one), and a key missing
from the bucket fetched from the local archive's MAST route instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.fetch.s3 import key_for_name
from tests.helpers import assert_mirror_matches_truth, mirrored_files, run_cli

moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server", reason="needs moto[s3,server]")
boto3 = pytest.importorskip("boto3")
werkzeug_app = pytest.importorskip("moto.moto_server.werkzeug_app")

pytestmark = pytest.mark.integration
TOKEN = "moto-contract-token-0123"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    status: str
    range: str | None
    if_range: str | None
    authorization: str | None


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[Seen]]]:
    """moto's S3 server on a free port of 127.0.0.1, with a log of every request it answered."""
    seen: list[Seen] = []

    def log_request(handler, code="-", size="-"):  # werkzeug's per-request hook, on the server
        headers = handler.headers
        seen.append(
            Seen(
                handler.command,
                handler.path,
                str(getattr(code, "value", code)),
                headers.get("Range"),
                headers.get("If-Range"),
                headers.get("Authorization"),
            )
        )

    monkeypatch.setattr(werkzeug_app.MotoRequestHandler, "log_request", log_request)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")  # boto3's setup calls are signed with these dummies
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}", seen
    finally:
        server.stop()


def test_tessmirror_fetch_reads_a_real_s3_server_anonymously_with_resume_multipart_and_fallback(
    archive, moto, tmp_path: Path
) -> None:
    endpoint, seen = moto
    arc = archive(targets=4, focus=(1, 1, 2), file_size="full")  # 2 MB light curves: worth resuming
    plan = tmp_path / "plan.ecsv"
    planned = run_cli(
        "plan", "--tap-url", arc.tap_url, "--sector", "1", "--camera", "1", "--ccd", "2", "-o", plan
    )
    assert planned.returncode == 0, planned.stderr
    names = sorted(n for n in arc.catalog if n.endswith("_lc.fits") and n in plan.read_text())
    assert len(names) >= 3
    resumed, multipart, missing, *plain = names

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="stpubdata")
    body = {name: b"".join(arc.catalog.render(arc.catalog[name].identity)) for name in names}
    for name in [resumed, *plain]:
        s3.put_object(Bucket="stpubdata", Key=key_for_name(name), Body=body[name], ACL="public-read")
    upload = s3.create_multipart_upload(Bucket="stpubdata", Key=key_for_name(multipart), ACL="public-read")
    part = s3.upload_part(
        Bucket="stpubdata",
        Key=key_for_name(multipart),
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=body[multipart],
    )
    s3.complete_multipart_upload(
        Bucket="stpubdata",
        Key=key_for_name(multipart),
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )
    assert "-" in s3.head_object(Bucket="stpubdata", Key=key_for_name(multipart))["ETag"]
    etag = s3.head_object(Bucket="stpubdata", Key=key_for_name(resumed))["ETag"]
    assert etag.strip('"') == hashlib.md5(body[resumed]).hexdigest()

    # A run killed mid-file left 700,000 bytes of `resumed` and the validator it had stored.
    out = tmp_path / "mirror"
    folder = out.joinpath(*key_for_name(resumed).split("/")[2:-1])  # the mast layout: tid/s0001/...
    folder.mkdir(parents=True)
    (folder / f"{resumed}.part").write_bytes(body[resumed][:700_000])
    (folder / f"{resumed}.meta.part").write_text(json.dumps({"validator": etag}))

    seen.clear()  # from here on, only tessmirror's requests
    conf = tmp_path / "tessmirror.toml"
    conf.write_text(f'[fetch]\nsource = "s3"\ns3_endpoint = "{endpoint}"\n')
    fetched = run_cli(
        "--config", conf, "fetch", "--input", plan, "--out", out, "--progress-interval", "0",
        env={"MAST_API_TOKEN": TOKEN},
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert_mirror_matches_truth(out, arc, set(names))
    assert set(mirrored_files(out)) == set(names)

    gets = [s for s in seen if s.method == "GET"]
    assert gets and all(s.authorization is None for s in gets)  # anonymous, and never the token
    (resume,) = [s for s in gets if s.path.endswith(resumed)]
    assert (resume.range, resume.if_range, resume.status) == ("bytes=700000-", etag, "206")
    assert [s.status for s in gets if s.path.endswith(missing)] in (["404"], ["403"])
    assert {r.name for r in arc.request_log if r.host == "api"} == {missing}  # the fallback, only
    assert f"{resumed}: resuming a part from an earlier run at byte 700000" in fetched.stderr
