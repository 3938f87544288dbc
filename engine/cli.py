"""The `tessmirror` command. Every flag is also a configuration key; flags win over the file.

Exit codes (see README): 0 all verified; 1 some files failed or a mirror check found problems;
2 bad input; 3 the archive failed; 4 this machine refused (disk, permissions, a lock); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from engine import __version__
from engine.exceptions import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    ConfigError,
    TessMirrorError,
)
from engine.redact import RedactingFilter, redact

log = logging.getLogger("tessmirror")

DEMO_OUT = "tessmirror-demo"
# A fixed port keeps the archive's URLs the same from one demo to the next, so a second
# `tessmirror demo` resumes (and skips every verified file) instead of downloading again.
DEMO_PORT = 27301  # below the ephemeral range (32768-60999), so no client socket holds it


# -- flag parsing -------------------------------------------------------------------------------
def _int_list(key: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        if text.strip().lower() == "all":
            return []
        try:
            return [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise ConfigError(key, f"expected numbers like 1,2,3 or 'all', got {text!r}") from None

    return parse


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _bytes_rate(text: str) -> float:
    """'5M', '500k', '2.5e6' -> bytes per second."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower().removesuffix("/s").removesuffix("b")
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigError("fetch.bandwidth_limit", f"expected a rate like 5M or 500k, got {text!r}") from None


def _lazy_parser(name: str) -> Callable[[str], object]:
    def parse(text: str) -> object:
        from engine import config

        return getattr(config, name)(text)

    return parse


def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection (also [selection] in the config file)")
    g.add_argument("--sector", dest="selection.sector", type=int, help="the FFI footprint's sector")
    g.add_argument(
        "--camera",
        dest="selection.cameras",
        type=_int_list("selection.cameras"),
        help="camera(s), e.g. 1 or 1,2 or all (default: all)",
    )
    g.add_argument(
        "--ccd",
        dest="selection.ccds",
        type=_int_list("selection.ccds"),
        help="CCD(s), e.g. 2 or 1,2 or all (default: all)",
    )
    g.add_argument(
        "--polygon",
        dest="selection.polygon",
        type=_lazy_parser("parse_polygon"),
        help="'ra1 dec1 ra2 dec2 ...' in degrees, instead of a footprint",
    )
    g.add_argument(
        "--cone",
        dest="selection.cone",
        type=_lazy_parser("parse_cone"),
        help="'ra dec radius' in degrees, instead of a footprint",
    )
    g.add_argument("--targets", dest="selection.targets_file", type=Path, help="file of TIC ids, one a line")
    g.add_argument(
        "--sectors",
        dest="selection.sectors",
        type=_lazy_parser("parse_sectors"),
        help="which sectors' products: all (default) or a list like 1,2,5-9",
    )
    g.add_argument(
        "--products",
        dest="selection.products",
        type=_str_list,
        help="product types, e.g. lc,tp,dvt or ffic (default: lc)",
    )
    g.add_argument(
        "--footprint",
        dest="selection.footprint",
        choices=("middle", "composite"),
        help="each CCD's footprint from its middle exposure (default) or first+middle+last",
    )
    g.add_argument(
        "--collection",
        dest="selection.collection",
        help="obs_collection: TESS (default) or HLSP (TESS-SPOC and QLP light curves)",
    )
    g.add_argument("--tap-url", dest="tap.url", help="TAP base URL (default: MAST's CAOM TAP)")


def _add_download(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    p.add_argument("--out", dest="output.out_dir", type=Path, required=out_required, help="output directory")
    g = p.add_argument_group("download (also [fetch], [verify], [output], [run] in the config file)")
    g.add_argument(
        "--concurrency", dest="fetch.concurrency", type=int, help="downloads in flight (default 8)"
    )
    g.add_argument("--per-host", dest="fetch.per_host", type=int, help="connections per host (default 8)")
    g.add_argument(
        "--verify",
        dest="verify.level",
        choices=("size", "checksum", "fits"),
        help="verification level (default fits)",
    )
    g.add_argument(
        "--layout",
        dest="output.layout",
        choices=("mast", "sector", "flat"),
        help="directory layout (default mast)",
    )
    g.add_argument(
        "--state-dir", dest="output.state_dir", type=Path, help="manifest and plan (default OUT/.tessmirror)"
    )
    g.add_argument("--retries", dest="fetch.retries", type=int, help="tries per file beyond the first")
    g.add_argument("--idle-timeout", dest="fetch.idle_timeout", type=float, help="seconds without a byte")
    g.add_argument(
        "--bandwidth", dest="fetch.bandwidth_limit", type=_bytes_rate, help="cap, e.g. 20M (bytes/s)"
    )
    g.add_argument(
        "--token-env", dest="fetch.token_env", help="environment variable holding an archive token"
    )
    g.add_argument(
        "--force", dest="run.force", action="store_const", const=True, help="skip the free-space preflight"
    )
    g.add_argument(
        "--recheck",
        dest="run.recheck",
        action="store_const",
        const=True,
        help="stat files the manifest says are done",
    )
    g.add_argument(
        "--refresh-plan",
        dest="run.refresh_plan",
        action="store_const",
        const=True,
        help="query TAP again even if a saved plan exists",
    )
    g.add_argument(
        "--no-fsync",
        dest="output.fsync",
        action="store_const",
        const=False,
        help="do not fsync files and the manifest (faster; less safe on power loss)",
    )
    g.add_argument(
        "--progress-interval",
        dest="run.progress_interval",
        type=float,
        help="seconds between log lines when not on a terminal",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessmirror", description="Verified, resumable bulk downloads of TESS products from MAST."
    )
    parser.add_argument("--version", action="version", version=f"tessmirror {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file (see config.example.toml)")
    common.add_argument("--log-level", dest="run.log_level", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", parents=[common], help="print or export the inventory")
    _add_selection(p)
    p.add_argument("--format", default="ecsv", choices=("ecsv", "votable", "csv", "urls", "aria2", "curl"))
    p.add_argument("-o", "--output", type=Path, help="write here instead of standard output")

    p = sub.add_parser("run", parents=[common], help="plan, then download into --out")
    _add_selection(p)
    _add_download(p)

    p = sub.add_parser("fetch", parents=[common], help="download a saved plan (ECSV) or a URL list")
    p.add_argument("--input", dest="selection.urls_file", type=Path, required=True)
    _add_download(p)

    p = sub.add_parser("status", parents=[common], help="report on a mirror from its manifest")
    p.add_argument("--out", dest="output.out_dir", type=Path, required=True)
    p.add_argument("--state-dir", dest="output.state_dir", type=Path)

    p = sub.add_parser("verify", parents=[common], help="re-check a mirror against its manifest")
    _add_download(p)
    p.add_argument("--level", dest="verify.level", choices=("size", "checksum", "fits"))
    p.add_argument("--repair", action="store_true", help="move bad files aside and download them again")

    p = sub.add_parser(
        "demo", parents=[common], help="start the local archive and mirror a footprint from it"
    )
    p.add_argument("--out", dest="output.out_dir", type=Path, default=Path(DEMO_OUT))
    p.add_argument("--targets", type=int, default=300, help="synthetic TIC targets in the archive")
    p.add_argument("--file-size", default="full", help="full (about 2 MB), small, or a cadence count")
    p.add_argument("--concurrency", dest="fetch.concurrency", type=int)
    p.add_argument(
        "--port",
        type=int,
        default=DEMO_PORT,
        help=f"archive port (default {DEMO_PORT}, or a free one if taken)",
    )

    p = sub.add_parser("archive", help="the local MAST-shaped archive")
    asub = p.add_subparsers(dest="archive_command", required=True, metavar="ARCHIVE_COMMAND")
    s = asub.add_parser("serve", help="serve the local archive until Ctrl-C / SIGTERM")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0, help="0: a free port")
    s.add_argument("--sectors", default="1-13", help="sectors to generate, e.g. 1-13")
    s.add_argument("--targets", type=int, default=2000, help="synthetic TIC targets")
    s.add_argument("--file-size", default="full", help="full (about 2 MB), small, or a cadence count")
    s.add_argument("--faults", default="", help="fault spec, e.g. '500=0.2,429=0.1:retry_after=2,seed=7'")
    s.add_argument("--data-dir", type=Path, help="cache for generated files (default: a temporary folder)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hard-limit", type=int, default=100_000, help="TAP row limit")
    s.add_argument(
        "--focus", type=_int_list("--focus"), help="put every target in one footprint: SECTOR,CAMERA,CCD"
    )
    s.add_argument(
        "--no-artifacts", action="store_true", help="serve no dbo.caomplane/caomartifact (ObsCore only)"
    )
    s.add_argument(
        "--hostile-names", action="store_true", help="add rows with hostile file names (for testing)"
    )
    s.add_argument("--log-level", dest="run.log_level")
    return parser


def _overrides(ns: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(ns).items() if "." in k and v is not None}


def _settings(ns: argparse.Namespace, extra: dict[str, object] | None = None, *, selection: bool = True):
    from engine.config import load_settings

    overrides = _overrides(ns)
    overrides.update(extra or {})
    return load_settings(getattr(ns, "config", None), overrides, require_selection=selection)


class _BarFriendlyHandler(logging.StreamHandler):
    """Writes log lines through tqdm, so a progress bar on the terminal is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _setup_logging(level: str | None) -> None:
    handler = _BarFriendlyHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    name = (level or "INFO").upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            "run.log_level", f"unknown log level {level!r}", hint="use DEBUG, INFO, WARNING or ERROR"
        )
    root.setLevel(name)
    # pyvo and astropy warn about things users cannot act on (units, VOTable versions).
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


# -- commands -----------------------------------------------------------------------------------
def cmd_plan(ns: argparse.Namespace) -> int:
    """Print or export the inventory, page by page as TAP answers (bounded memory)."""
    from engine.manager import plan_source_for
    from engine.plan.table import PlanExporter

    settings = _settings(ns)
    out: TextIO = sys.stdout
    if ns.output:
        try:
            out = open(ns.output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as err:
            raise ConfigError(
                "-o/--output",
                f"cannot write {ns.output}: {err.strerror}",
                hint="give a path in an existing, writable directory",
            ) from None
    exporter = PlanExporter(ns.format, out)

    async def export() -> int:
        count = 0
        async for page in plan_source_for(settings, save=False).pages():
            exporter.write(page)
            count += len(page)
        return count

    try:
        count = asyncio.run(export())
        exporter.close()
    finally:
        if out is not sys.stdout:
            out.close()
    if ns.output:
        log.info("wrote the plan of %d files to %s (%s)", count, ns.output, ns.format)
    return EXIT_OK


def _run_mirror(settings, source=None) -> int:
    from engine.manager import MirrorRun, summarize

    outcome = asyncio.run(MirrorRun(settings, source, collect_results=False).run())
    for line in summarize(outcome):
        print(line, file=sys.stderr)
    if outcome.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
    return outcome.exit_code


def cmd_run(ns: argparse.Namespace) -> int:
    return _run_mirror(_settings(ns))


def cmd_status(ns: argparse.Namespace) -> int:
    from engine.manifest import Manifest
    from engine.progress import human_bytes

    settings = _settings(ns, selection=False)
    manifest_path = settings.state_dir / "manifest.jsonl"
    if not manifest_path.exists():
        raise ConfigError(
            "output.out_dir",
            f"no tessmirror manifest at {manifest_path}",
            hint="give the --out of an earlier `tessmirror run`",
        )
    entries = Manifest(settings.state_dir).load()
    counts = Counter(e.status for e in entries.values())
    nbytes = sum(e.nbytes for e in entries.values() if e.status == "verified")
    print(f"mirror      {settings.output.out_dir}")
    print(f"files       {len(entries)}")
    for status, n in sorted(counts.items()):
        print(f"{status:<11} {n}")
    print(f"bytes       {human_bytes(nbytes)} verified")
    plan = settings.state_dir / "plan.ecsv"
    if plan.exists():
        from engine.plan.table import iter_plan

        planned = sum(1 for _ in iter_plan(plan))
        print(f"planned     {planned} ({max(planned - counts.get('verified', 0), 0)} still to do)")
    failed = [e for e in entries.values() if e.status == "failed"]
    for e in failed[:20]:
        print(f"  ! {e.path or e.url}: {e.error}")
    return EXIT_OK if not failed else EXIT_PARTIAL


def cmd_verify(ns: argparse.Namespace) -> int:
    from engine.manager import TablePlan
    from engine.manifest import Manifest
    from engine.mirrorcheck import check_mirror
    from engine.plan.table import items_to_table, iter_plan

    settings = _settings(ns, selection=False)
    manifest = Manifest(settings.state_dir)
    if not manifest.path.exists():
        raise ConfigError(
            "output.out_dir",
            f"no tessmirror manifest at {manifest.path}",
            hint="give the --out of an earlier `tessmirror run`",
        )

    def progress(done: int, total: int) -> None:
        log.info("verify: %d/%d files checked", done, total)

    report = check_mirror(
        settings.output.out_dir,
        manifest,
        level=settings.verify.level,
        repair=ns.repair,
        progress=progress,
        workers=max(settings.verify.workers, 1),
    )
    print(f"checked     {report.checked}", file=sys.stderr)
    print(f"ok          {report.ok}", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem.kind:<10} {problem.path}  {problem.detail}", file=sys.stderr)
    if not report.problems:
        return EXIT_OK
    if not ns.repair:
        print(
            f"{len(report.problems)} problem(s); `tessmirror verify --repair` downloads them again",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    # Re-download what was quarantined: the saved plan knows each file's declared size and md5.
    pending = {e.url for e in manifest.load().values() if e.status == "pending"}
    plan_path = settings.state_dir / "plan.ecsv"
    if plan_path.exists():
        items = [i for i in iter_plan(plan_path) if redact(i.url) in pending]
    else:
        from engine.models import PlanItem

        items = [
            PlanItem(url=e.url, filename=Path(e.path).name, obs_id=e.obs_id, size=e.nbytes, md5=e.md5)
            for e in manifest.load().values()
            if e.status == "pending"
        ]
    print(f"repairing {len(items)} file(s)", file=sys.stderr)
    return _run_mirror(settings, TablePlan(items_to_table(items)))


def cmd_fetch(ns: argparse.Namespace) -> int:
    return _run_mirror(_settings(ns))


def _archive_options(ns: argparse.Namespace, **extra):
    from engine.archive.faults import FaultPlan
    from engine.archive.server import ArchiveOptions
    from engine.config import parse_sectors

    try:
        faults = FaultPlan.from_spec(ns.faults) if getattr(ns, "faults", "") else FaultPlan()
    except ValueError as err:
        raise ConfigError("--faults", str(err)) from None
    sectors = parse_sectors(ns.sectors) if isinstance(getattr(ns, "sectors", None), str) else None
    file_size: str | int = ns.file_size
    if isinstance(file_size, str) and file_size.isdigit():
        file_size = int(file_size)
    options = dict(targets=ns.targets, file_size=file_size, faults=faults, **extra)
    if sectors:
        options["sectors"] = sectors
    return ArchiveOptions(**options)


def cmd_archive_serve(ns: argparse.Namespace) -> int:
    from engine.archive.server import serve_forever

    if ns.focus and len(ns.focus) != 3:
        raise ConfigError("--focus", f"expected SECTOR,CAMERA,CCD, got {ns.focus}")
    options = _archive_options(
        ns,
        host=ns.host,
        port=ns.port,
        seed=ns.seed,
        data_dir=ns.data_dir,
        tap_hard_limit=ns.hard_limit,
        focus=tuple(ns.focus) if ns.focus else None,
        artifacts=not ns.no_artifacts,
        hostile_names=ns.hostile_names,
    )

    def ready(archive) -> None:
        print(f"TAP service:  {archive.tap_url}", flush=True)
        print(
            f"file server:  {archive.base_url}/api/v0.1/Download/file?uri=mast:TESS/product/<file>",
            flush=True,
        )
        print("Ctrl-C or SIGTERM stops it.", flush=True)

    serve_forever(options, on_ready=ready)
    return EXIT_OK


def cmd_demo(ns: argparse.Namespace) -> int:
    """The notebook's use case, end to end, against the local archive."""
    from engine.archive.server import ArchiveThread

    # Every synthetic target inside the notebook's footprint, so the demo has a few hundred files.
    options = _archive_options(ns, sectors=(1,), focus=(1, 1, 2), port=ns.port)
    log.info("starting the local archive (%d targets, %s files)...", ns.targets, ns.file_size)
    thread = ArchiveThread(options)
    try:
        thread.start()
    except OSError as err:  # the port is taken: any free one will do (this demo then downloads anew)
        log.info("port %d is busy (%s); using a free port", ns.port, err.strerror)
        thread = ArchiveThread(dataclasses.replace(options, port=0))
        thread.start()
    try:
        archive = thread.archive
        log.info("local archive: %s", archive.tap_url)
        settings = _settings(
            ns,
            {
                "tap.url": archive.tap_url,
                "selection.sector": 1,
                "selection.cameras": [1],
                "selection.ccds": [2],
            },
        )
        code = _run_mirror(settings)
    finally:
        thread.stop()
    print(
        f"mirror in {settings.output.out_dir}; `tessmirror status --out {settings.output.out_dir}` "
        "reports on it, `tessmirror verify --out ...` re-checks it",
        file=sys.stderr,
    )
    return code


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": cmd_plan,
    "run": cmd_run,
    "fetch": cmd_fetch,
    "status": cmd_status,
    "verify": cmd_verify,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        # Inside the try: flag parsers (--polygon, --cone, --ccd x) raise ConfigError, which argparse
        # does not catch.
        ns = parser.parse_args(argv)
        _setup_logging(getattr(ns, "run.log_level", None))
        if ns.command == "archive":
            return cmd_archive_serve(ns)
        return COMMANDS[ns.command](ns)
    except TessMirrorError as err:
        print(f"tessmirror: error: {redact(err.message)}", file=sys.stderr)
        if err.hint:
            print(f"tessmirror: hint: {redact(err.hint)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("tessmirror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: say so plainly, keep the traceback for --log-level DEBUG
        log.debug("internal error", exc_info=True)
        print(
            f"tessmirror: internal error: {redact(repr(err))} (run with --log-level DEBUG for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
