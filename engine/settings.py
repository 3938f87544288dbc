"""The configuration schema: one dataclass per TOML table, with the defaults.

Each section checks its own values when it is built (`__post_init__`, which calls its `validate()`):
a bad value, from the TOML loader, the Python API or `dataclasses.replace`, raises `ConfigError`
naming the dotted key and the fix. Checks that read two sections, or an http(s) URL that tests give
as a placeholder, stay in `engine.config.validate_settings`, which also re-runs every section's
`validate()` (the sections are mutable). Defaults are polite: modest concurrency, an idle timeout
rather than a total one, full checks.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.exceptions import ConfigError
from engine.layout import check_layout
from engine.models import VerifyLevel
from engine.shard import parse_shard
from engine.validation import (
    LOG_LEVELS,
    SECTOR_MAX,
    SECTOR_MIN,
    at_least,
    check_http_url,
    check_range,
    check_types,
    positive_timeout,
    validate_cone,
    validate_polygon,
)

MAST_TAP_URL = "https://mast.stsci.edu/vo-tap/api/v0.1/caom"
PRODUCT_SUFFIXES: dict[str, str] = {
    "lc": "_lc.fits",
    "tp": "_tp.fits",
    "dvt": "_dvt.fits",
    "dvr": "_dvr.pdf",
    "dvm": "_dvm.pdf",
    "dvs": "_dvs.pdf",
    "fast-lc": "_fast-lc.fits",
    "fast-tp": "_fast-tp.fits",
    # Full-frame images: planned from the per-exposure FFI observations, not from light-curve rows.
    "ffic": "_ffic.fits",
    "ffir": "_ffir.fits",
}
# How the footprint of a sector/camera/CCD is taken from its per-exposure FFI observations.
FOOTPRINTS = ("middle", "composite")
# Where file bytes come from: MAST's Download API, the public S3 copy (AWS Open Data), or S3 where the
# file is there and MAST otherwise.
SOURCES = ("mast", "s3", "auto")
S3_ENDPOINT = "https://stpubdata.s3.us-east-1.amazonaws.com"
# Never buffer more than this per read, whatever fetch.chunk_size says.
CHUNK_SIZE_MAX = 64 * 1024 * 1024
AUTO = "auto"  # fetch.concurrency: measure the path instead of taking a number
CONCURRENCY_MAX = 256  # fetch.concurrency and fetch.max_connections: 1..this


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A section's field name -> its resolved type hint (the annotations are strings here)."""
    return typing.get_type_hints(cls)


@dataclass(slots=True)
class TapSettings:
    url: str = field(
        default=MAST_TAP_URL, metadata={"help": "TAP base URL (default: MAST's CAOM TAP)", "metavar": "URL"}
    )
    # Rows asked per TAP job. None: 10,000, capped at the service's hard limit from /capabilities.
    page_size: int | None = None
    poll_timeout: float = 10.0  # seconds for one UWS poll (pyvo's WAIT)
    job_timeout: float = 1800.0  # a job not finished by then (e.g. stuck QUEUED) is abandoned
    retries: int = 4  # tries per TAP job beyond the first
    # Every HTTP request to the TAP service (capabilities, job submission, polls, results): no
    # answer within this many seconds (connect, or between bytes) ends that try.
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``tap.<field>``."""
        check_types("tap", self, _hints(TapSettings))
        check_http_url("tap.url", self.url, example="https://host/path/caom")
        at_least("tap.page_size", self.page_size, 1)
        at_least("tap.retries", self.retries, 0)
        positive_timeout("tap.poll_timeout", self.poll_timeout)
        positive_timeout("tap.job_timeout", self.job_timeout)
        positive_timeout("tap.request_timeout", self.request_timeout)


@dataclass(slots=True)
class Selection:
    """What to mirror. Exactly one *source* is used, in this order of precedence:
    urls_file, targets_file, polygon, cone, footprint (sector + cameras + ccds)."""

    # the FFI footprint's sector (the notebook's `sector`)
    sector: int | None = field(
        default=None, metadata={"help": "the FFI footprint's sector (1-200)", "metavar": "N"}
    )
    # empty: all four
    cameras: list[int] = field(
        default_factory=list,
        metadata={
            "help": "camera(s) of the footprint, e.g. 1 or 1,2 or 1-3 or all (default: all)",
            "metavar": "LIST",
        },
    )
    # empty: all four
    ccds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "CCD(s) of the footprint, e.g. 2 or 1,2 or 1-3 or all (default: all)",
            "metavar": "LIST",
        },
    )
    # [ra1, dec1, ra2, dec2, ...] in degrees, ICRS
    polygon: list[float] | None = field(
        default=None,
        metadata={
            "help": "a sky polygon in degrees (at least 3 vertices), instead of a footprint",
            "metavar": "'RA DEC RA DEC ...'",
        },
    )
    # (ra, dec, radius) in degrees
    cone: tuple[float, float, float] | None = field(
        default=None,
        metadata={"help": "a cone in degrees, instead of a footprint", "metavar": "'RA DEC RADIUS'"},
    )
    # TIC ids or target names, one a line
    targets_file: Path | None = field(
        default=None, metadata={"help": "file of TIC ids, one a line", "metavar": "FILE"}
    )
    # URLs, one a line, or a saved plan (ECSV)
    urls_file: Path | None = field(
        default=None,
        metadata={
            "help": (
                "a plan in any format `tessmirror plan` writes (ECSV, CSV, VOTable, URL list, aria2 input, "
                "curl script such as MAST's tesscurl_*.sh), told from its content; - reads standard input"
            ),
            "metavar": "FILE",
        },
    )
    # which sectors' products; None: all, as in the notebook
    sectors: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "keep products of these sectors only: all (default) or e.g. 1,2,5-9 (the footprint is "
                "--sector)"
            ),
            "metavar": "LIST",
        },
    )
    products: list[str] = field(
        default_factory=lambda: ["lc"],
        metadata={"help": "product types, e.g. lc,tp,dvt or ffic (default: lc)", "metavar": "LIST"},
    )
    # obs_collection; keeps HLSPs (e.g. *_llc.fits) out
    collection: str = field(
        default="TESS",
        metadata={
            "help": "obs_collection: TESS (default) or HLSP (TESS-SPOC and QLP light curves)",
            "metavar": "NAME",
        },
    )
    # "middle": the middle exposure's polygon (by obs_id) of each camera/CCD; "composite": the first,
    # middle and last exposures' polygons, so pointing jitter loses no target near an edge.
    footprint: str = field(
        default="middle",
        metadata={"help": "each CCD's footprint from its middle exposure (default) or first+middle+last"},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``selection.<field>``. A closing polygon vertex is
        dropped and product names are lower-cased, as the loader does. Which selections may be
        combined (one region; cameras need a sector) is `engine.config.validate_settings`'s check."""
        check_types("selection", self, _hints(Selection))
        if self.sector is not None:
            check_range("selection.sector", self.sector, SECTOR_MIN, SECTOR_MAX, "sector")
        for sector in self.sectors or ():
            check_range("selection.sectors", sector, SECTOR_MIN, SECTOR_MAX, "sector")
        for camera in self.cameras:
            check_range("selection.cameras", camera, 1, 4, "camera")
        for ccd in self.ccds:
            check_range("selection.ccds", ccd, 1, 4, "CCD")
        if self.polygon is not None:
            self.polygon = validate_polygon([float(v) for v in self.polygon], key="selection.polygon")
        if self.cone is not None:
            self.cone = validate_cone(self.cone, key="selection.cone")
        known = ", ".join(PRODUCT_SUFFIXES)
        products: list[str] = []
        for product in self.products:
            name = product.strip().lower()
            if name not in PRODUCT_SUFFIXES:
                raise ConfigError(
                    "selection.products",
                    f"unknown product type {product!r}",
                    hint=f"use one or more of: {known}",
                )
            if name not in products:
                products.append(name)
        if not products:
            raise ConfigError(
                "selection.products", "no product type given", hint=f"use one or more of: {known}"
            )
        self.products = products
        if self.footprint not in FOOTPRINTS:
            raise ConfigError(
                "selection.footprint",
                f"unknown footprint {self.footprint!r}",
                hint=f"use one of: {', '.join(FOOTPRINTS)}",
            )
        if not self.collection.strip():
            raise ConfigError("selection.collection", "must not be empty", hint="use TESS")


@dataclass(slots=True)
class OutputSettings:
    out_dir: Path = field(
        default=Path("tessmirror-data"), metadata={"help": "output directory", "metavar": "DIR"}
    )
    # "mast": tid/s0001/0000/0000/2515/5310/<file> as on archive.stsci.edu; "sector": s0001/<file>;
    # "flat": <file>. "mast" keeps every directory small, which parallel filesystems need.
    layout: str = field(default="mast", metadata={"help": "directory layout"})
    # default: <out_dir>/.tessmirror
    state_dir: Path | None = field(
        default=None,
        metadata={"help": "manifest and saved plan (default: DIR/.tessmirror)", "metavar": "DIR"},
    )
    # fsync each file before its rename, and the manifest per batch. The help is that of --no-fsync,
    # the flag that sets it (each field's metadata holds its CLI flag's help and metavar).
    fsync: bool = field(
        default=True,
        metadata={"help": "do not fsync files and the manifest (faster; less safe on power loss)"},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``output.<field>``. A `str` path becomes a Path."""
        check_types("output", self, _hints(OutputSettings))
        check_layout(self.layout)


@dataclass(slots=True)
class FetchSettings:
    # Downloads in flight, in total: a number fixes it; AUTO measures the path and settles on what
    # it needs, never above `max_connections` (engine/fetch/autotune.py).
    concurrency: int | str = field(
        default=8,
        metadata={
            "help": (
                "downloads in flight: a number fixes it; auto measures the path and settles on what it "
                "needs, at most --max-connections"
            ),
            "metavar": "N|auto",
        },
    )
    # The politeness cap of AUTO: 32 connections carry 1 Gbit/s at 4 MiB/s each; past that, an
    # archive shared by many users sees one client take an unfair share of its server slots.
    max_connections: int = field(
        default=32, metadata={"help": "the politeness cap of --concurrency auto", "metavar": "N"}
    )
    # Connections per host; None: as many as `concurrency`. MAST serves every file from one host, so a
    # smaller number would silently cap --concurrency (16 downloads over 8 connections).
    per_host: int | None = field(
        default=None,
        metadata={"help": "connections per host (default: same as --concurrency)", "metavar": "N"},
    )
    chunk_size: int = 256 * 1024
    connect_timeout: float = 30.0
    # no byte for this long ends the try; never a total timeout
    idle_timeout: float = field(
        default=60.0, metadata={"help": "end a try after this long without a byte", "metavar": "SECONDS"}
    )
    # tries per file beyond the first
    retries: int = field(default=8, metadata={"help": "tries per file beyond the first", "metavar": "N"})
    backoff_initial: float = 1.0
    backoff_max: float = 120.0
    # bytes/s for the whole run; None: no cap
    bandwidth_limit: float | None = field(
        default=None,
        metadata={"help": "cap for the whole run in bytes/s, e.g. 20M (default: none)", "metavar": "RATE"},
    )
    max_redirects: int = 5
    # environment variable holding an archive token
    token_env: str | None = field(
        default="MAST_API_TOKEN",
        metadata={"help": "environment variable holding an archive token", "metavar": "VAR"},
    )
    # access_estsize is rounded kB: accept |bytes - kB*1024| <= tolerance*bytes + 1024.
    est_size_tolerance: float = 0.05
    # A body is never allowed past this many bytes when the plan declares no size at all.
    max_file_size: int = 4 * 1024**3
    # one of SOURCES
    source: str = field(
        default="mast",
        metadata={
            "help": (
                "where file bytes come from: MAST (default), its public S3 copy, or S3 where it has the file"
            )
        },
    )
    # the bucket's HTTPS endpoint (path-style: ENDPOINT/stpubdata/...)
    s3_endpoint: str = field(
        default=S3_ENDPOINT, metadata={"help": "the public S3 bucket's HTTPS endpoint", "metavar": "URL"}
    )
    user_agent: str = "tessmirror/0.1 (+https://github.com/tessmirror)"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``fetch.<field>``."""
        check_types("fetch", self, _hints(FetchSettings))
        if self.source not in SOURCES:
            raise ConfigError(
                "fetch.source", f"unknown source {self.source!r}", hint=f"use one of: {', '.join(SOURCES)}"
            )
        check_http_url("fetch.s3_endpoint", self.s3_endpoint, example=S3_ENDPOINT)
        positive_timeout("fetch.connect_timeout", self.connect_timeout)
        positive_timeout("fetch.idle_timeout", self.idle_timeout)
        if not self.auto_concurrency and not (
            isinstance(self.concurrency, int) and 1 <= self.concurrency <= CONCURRENCY_MAX
        ):
            raise ConfigError(
                "fetch.concurrency",
                f"{self.concurrency!r} is outside 1..{CONCURRENCY_MAX}",
                hint=f"a modest value such as 8-32 is polite to the archive, or {AUTO!r} to measure it",
            )
        if not 1 <= self.max_connections <= CONCURRENCY_MAX:
            raise ConfigError(
                "fetch.max_connections",
                f"{self.max_connections} is outside 1..{CONCURRENCY_MAX}",
                hint="the cap of --concurrency auto; "
                "32 (the default) carries 1 Gbit/s at 4 MiB/s a connection",
            )
        at_least("fetch.per_host", self.per_host, 1)
        at_least("fetch.chunk_size", self.chunk_size, 1024)
        if self.chunk_size > CHUNK_SIZE_MAX:
            raise ConfigError(
                "fetch.chunk_size",
                f"{self.chunk_size} is above the maximum {CHUNK_SIZE_MAX} (64 MiB)",
                hint="the default 262144 (256 kB) is right for almost every link",
            )
        at_least("fetch.max_file_size", self.max_file_size, 1)
        at_least("fetch.retries", self.retries, 0)
        at_least("fetch.max_redirects", self.max_redirects, 0)
        at_least("fetch.backoff_initial", self.backoff_initial, 0)
        at_least("fetch.backoff_max", self.backoff_max, self.backoff_initial)
        at_least("fetch.est_size_tolerance", self.est_size_tolerance, 0)
        if self.bandwidth_limit is not None and self.bandwidth_limit <= 0:
            raise ConfigError("fetch.bandwidth_limit", "must be positive bytes/s", hint="omit it for no cap")

    @property
    def auto_concurrency(self) -> bool:
        """True when the number of downloads in flight is measured (`--concurrency auto`)."""
        return self.concurrency == AUTO

    @property
    def connections(self) -> int:
        """The most downloads (and connections) in flight: the fixed number, or AUTO's cap."""
        return self.max_connections if self.concurrency == AUTO else int(self.concurrency)


@dataclass(slots=True)
class VerifySettings:
    level: VerifyLevel = field(default=VerifyLevel.FITS, metadata={"help": "verification level"})
    workers: int = 2  # threads for FITS checks (astropy releases the GIL in its checksums)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``verify.<field>``. A level's name becomes the member."""
        check_types("verify", self, _hints(VerifySettings))
        at_least("verify.workers", self.workers, 1)


@dataclass(slots=True)
class RunSettings:
    # seconds between plain log lines when not on a terminal
    progress_interval: float = field(
        default=30.0,
        metadata={"help": "seconds between progress lines when not on a terminal", "metavar": "SECONDS"},
    )
    # skip the free-space preflight
    force: bool = field(default=False, metadata={"help": "skip the free-space preflight"})
    # stat/verify files the manifest says are done
    recheck: bool = field(default=False, metadata={"help": "stat files the manifest says are done"})
    # query TAP again even when a saved plan exists
    refresh_plan: bool = field(
        default=False, metadata={"help": "query TAP again even if a saved plan exists"}
    )
    # "K/N": download only shard K of N of the plan (job arrays; engine.shard)
    shard: str | None = field(
        default=None,
        metadata={
            "help": (
                "download only shard K of N of the plan (0 <= K < N; a stable split by file, for job "
                "arrays: each shard has its own manifest and lock, see docs/HPC.md)"
            ),
            "metavar": "K/N",
        },
    )
    log_level: str = field(
        default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR", "metavar": "LEVEL"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``run.<field>``. The log level is upper-cased and
        the shard written in its ``K/N`` form, as the loader always did."""
        check_types("run", self, _hints(RunSettings))
        at_least("run.progress_interval", self.progress_interval, 0)
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(
                "run.log_level",
                f"unknown level {self.log_level!r}",
                hint=f"use one of: {', '.join(LOG_LEVELS)}",
            )
        self.log_level = self.log_level.upper()
        if self.shard is not None:
            shard = parse_shard(self.shard, "run.shard")
            self.shard = str(shard) if shard is not None else None


@dataclass(slots=True)
class ClusterSettings:
    """`tessmirror run --cluster ...`: where the downloads run (engine/cluster). The driver plans,
    holds the lock and writes the manifest; `jobs` workers each run one batch at a time with
    `job_concurrency` connections, so the archive sees at most jobs x job_concurrency."""

    # None: in this process; "local", "slurm", "slurm-runner" or "tcp://HOST:PORT"
    mode: str | None = field(
        default=None,
        metadata={
            "help": (
                "spread the downloads over Dask workers: local (processes on this machine), slurm (one "
                "Slurm job per worker), slurm-runner (inside one sbatch -N K allocation, under srun) or "
                "tcp://HOST:PORT (an existing scheduler whose workers have --resources MAST=1); default: in "
                "this process"
            ),
            "metavar": "WHERE",
        },
    )
    # Dask workers (Slurm jobs under slurm); each runs one batch at a time. None: 2, or under
    # slurm-runner the allocation's worker ranks (SLURM_NTASKS - 2)
    jobs: int | None = field(
        default=None,
        metadata={
            "help": "workers (Slurm jobs), each running one batch at a time (default: 2; under "
            "slurm-runner, the allocation's tasks minus 2)",
            "metavar": "N",
        },
    )
    # connections per job; None: fetch.concurrency (8 under auto)
    job_concurrency: int | None = field(
        default=None,
        metadata={
            "help": (
                "connections per worker; the archive sees at most N x C (default: --concurrency, 8 under "
                "auto)"
            ),
            "metavar": "C",
        },
    )
    # Slurm partition (--partition) of the worker jobs
    queue: str | None = field(
        default=None, metadata={"help": "Slurm partition of the worker jobs", "metavar": "Q"}
    )
    # Slurm account (--account) of the worker jobs
    account: str | None = field(
        default=None, metadata={"help": "Slurm account of the worker jobs", "metavar": "A"}
    )
    # HH:MM:SS time limit of each worker job (dask-jobqueue's default: 30 min)
    walltime: str | None = field(
        default=None,
        metadata={
            "help": (
                "time limit of each Slurm worker job (default: dask-jobqueue's, 00:30:00); workers leave "
                "five minutes before it and are replaced"
            ),
            "metavar": "HH:MM:SS",
        },
    )
    # more #SBATCH options, e.g. ["--qos=debug"]
    job_extra: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "one more #SBATCH option for the worker jobs, written --job-extra=--qos=debug (repeatable)"
            ),
            "metavar": "OPTION",
        },
    )
    job_cores: int = 2  # --cpus-per-task of a worker job (checksums and FITS checks use them)
    job_memory: str = "2GB"  # memory of a worker job (sbatch --mem)
    batch_files: int = 200  # files per batch (a batch is one Dask task)
    batch_bytes: int = 1_000_000_000  # declared bytes per batch, whichever limit comes first
    # a batch without a byte, a finished file or a lease wait this long has stalled: its worker is
    # restarted and the batch runs again (past the idle timeout, the longest backoff and a pause)
    stall_timeout: float = 900.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError naming ``cluster.<field>``. The walltime and memory are
        stripped of spaces. A cluster beside ``run.shard``, or a mode whose extra is not installed,
        is refused by `engine.config.validate_settings` (two sections; the environment)."""
        # engine.cluster reads CONCURRENCY_MAX from this module, so it is imported here, not on top.
        from engine.cluster import JOBS_MAX, check_job_extra, check_memory, check_walltime, parse_mode

        check_types("cluster", self, _hints(ClusterSettings))
        parse_mode(self.mode)
        if self.jobs is not None and not 1 <= self.jobs <= JOBS_MAX:
            raise ConfigError("cluster.jobs", f"{self.jobs} is outside 1..{JOBS_MAX}", hint="e.g. --jobs 4")
        if self.job_concurrency is not None and not 1 <= self.job_concurrency <= CONCURRENCY_MAX:
            raise ConfigError(
                "cluster.job_concurrency",
                f"{self.job_concurrency} is outside 1..{CONCURRENCY_MAX}",
                hint="connections per job; the archive sees jobs x job-concurrency in all, e.g. 4 x 8",
            )
        self.walltime = check_walltime(self.walltime)
        self.job_memory = check_memory(self.job_memory)
        self.job_extra = check_job_extra("cluster.job_extra", self.job_extra)
        if self.job_cores < 1:
            raise ConfigError("cluster.job_cores", f"{self.job_cores} must be at least 1", hint="e.g. 2")
        if self.batch_files < 1:
            raise ConfigError(
                "cluster.batch_files", f"{self.batch_files} must be at least 1", hint="e.g. 200"
            )
        if self.batch_bytes < 1:
            raise ConfigError("cluster.batch_bytes", f"{self.batch_bytes} must be positive", hint="e.g. 1e9")
        positive_timeout("cluster.stall_timeout", self.stall_timeout)


@dataclass(slots=True)
class Settings:
    tap: TapSettings = field(default_factory=TapSettings)
    selection: Selection = field(default_factory=Selection)
    output: OutputSettings = field(default_factory=OutputSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    run: RunSettings = field(default_factory=RunSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        for name, cls in _hints(Settings).items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(name, f"expected a {cls.__name__}, got {getattr(self, name)!r}")

    @property
    def state_dir(self) -> Path:
        return self.output.state_dir or self.output.out_dir / ".tessmirror"
