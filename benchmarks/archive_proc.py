"""The local archive in its own process, driven over stdin/stdout with one JSON object a line.

    python -m benchmarks.archive_proc '{"sectors": [1], "targets": 1000, "file_size": "full"}'

It prints `{"ready": true, "tap_url": ..., "base_url": ...}` once it listens, then answers each
command line with one JSON line:

* `{"cmd": "faults", "spec": "latency=0.075,bandwidth=3e6,linkcap=6.4e7"}`: swap the fault plan;
* `{"cmd": "warm", "product": "lc"}`: render every file of that product now, so no tool pays for it;
* `{"cmd": "truth", "path": FILE, "product": "lc"}`: write {name: [size, md5]} for those files;
* `{"cmd": "events", "path": FILE}`: write the file requests and TAP result fetches served so far,
  as [[time, kind, name, status], ...] (kind "file" with the file name, or "tap_result" with the
  job's ADQL), then forget them;
* `{"cmd": "stop"}`.

A separate process keeps the server's Python work off the GIL of whatever it is measured against.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.archive import tap as tap_module
from engine.archive.faults import FaultPlan
from engine.archive.files import FileStore
from engine.archive.server import ArchiveOptions, ArchiveThread

# TAP result fetches, recorded by the wrapper below: (time.time(), the job's ADQL). The planner
# fetches a page's rows right after its job finishes, so this is when each page "arrives".
_TAP_RESULTS: list[tuple[float, str]] = []
_original_result = tap_module.TapService._result


async def _timed_result(self: Any, request: Any) -> Any:
    response = await _original_result(self, request)
    job = self._jobs.get(request.match_info.get("job", ""))
    params = {k.lower(): v for k, v in (job.params if job is not None else {}).items()}
    _TAP_RESULTS.append((time.time(), params.get("query", "")))
    return response


def _instrument_tap() -> None:
    """Record when each TAP result is served (patched before the routes are bound)."""
    tap_module.TapService._result = _timed_result  # type: ignore[method-assign]


def _options(spec: dict[str, Any]) -> ArchiveOptions:
    fields = dict(spec)
    faults = fields.pop("faults", "")
    if "sectors" in fields:
        fields["sectors"] = tuple(fields["sectors"])
    if "data_dir" in fields and fields["data_dir"] is not None:
        fields["data_dir"] = Path(fields["data_dir"])
    return ArchiveOptions(**fields, faults=FaultPlan.from_spec(faults) if faults else FaultPlan())


def _warm(running: ArchiveThread, product: str) -> int:
    """Render every file of `product` into the data directory (threads: the renderer is numpy)."""
    archive = running.archive
    assert archive is not None and archive.catalog is not None and archive.data_dir is not None
    store = FileStore(archive.catalog, archive.data_dir)
    entries = [f for f in archive.catalog.files.values() if f.product == product]

    def render(entry: Any) -> None:
        target = archive.data_dir / entry.name
        if not (target.exists() and target.stat().st_size == entry.size):
            store._write(entry, target)  # the archive's own renderer, so the bytes are the truth

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(render, entries))
    return len(entries)


def _handle(running: ArchiveThread, command: dict[str, Any]) -> dict[str, Any]:
    archive = running.archive
    assert archive is not None and archive.catalog is not None
    cmd = command.get("cmd")
    if cmd == "faults":
        plan = FaultPlan.from_spec(command.get("spec", ""))

        def swap() -> None:
            archive.faults = plan

        running.call(swap)
        return {"ok": True}
    if cmd == "warm":
        return {"ok": True, "files": _warm(running, command.get("product", "lc"))}
    if cmd == "truth":
        product = command.get("product", "lc")
        truth = {f.name: [f.size, f.md5] for f in archive.catalog.files.values() if f.product == product}
        Path(command["path"]).write_text(json.dumps(truth))
        return {"ok": True, "files": len(truth)}
    if cmd == "events":
        log = list(archive.request_log)
        events = [[r.time, "file", r.name, r.status] for r in log if r.method == "GET"]
        events += [[t, "tap_result", query, 200] for t, query in list(_TAP_RESULTS)]
        events.sort()
        # Forget what was reported, so the next scenario's events start clean.
        del archive.request_log[: len(log)]
        _TAP_RESULTS.clear()
        Path(command["path"]).write_text(json.dumps(events))
        return {"ok": True, "events": len(events)}
    if cmd == "stop":
        return {"ok": True, "stopping": True}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0]) if argv else {}
    _instrument_tap()
    started = time.monotonic()
    running = ArchiveThread(_options(spec), start_timeout=900)
    archive = running.start()
    ready = {
        "ready": True,
        "tap_url": archive.tap_url,
        "base_url": archive.base_url,
        "files": len(archive.catalog or {}),
        "start_seconds": round(time.monotonic() - started, 2),
    }
    print(json.dumps(ready), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                answer = _handle(running, json.loads(line))
            except Exception as err:  # report to the driver, keep serving
                answer = {"ok": False, "error": repr(err)}
            print(json.dumps(answer), flush=True)
            if answer.get("stopping"):
                break
    finally:
        running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
