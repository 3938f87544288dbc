"""The configuration schema: one dataclass per TOML table, with the defaults.

`engine.config` reads TOML and CLI flags into these and validates them; everything else only reads
them. Defaults are polite: modest concurrency, an idle timeout rather than a total one, full checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.models import VerifyLevel

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


@dataclass(slots=True)
class TapSettings:
    url: str = MAST_TAP_URL
    # Rows asked per TAP job. None: 10,000, capped at the service's hard limit from /capabilities.
    page_size: int | None = None
    poll_timeout: float = 10.0  # seconds for one UWS poll (pyvo's WAIT)
    job_timeout: float = 1800.0  # a job not finished by then (e.g. stuck QUEUED) is abandoned
    retries: int = 4  # tries per TAP job beyond the first
    # Every HTTP request to the TAP service (capabilities, job submission, polls, results): no
    # answer within this many seconds (connect, or between bytes) ends that try.
    request_timeout: float = 60.0


@dataclass(slots=True)
class Selection:
    """What to mirror. Exactly one *source* is used, in this order of precedence:
    urls_file, targets_file, polygon, cone, footprint (sector + cameras + ccds)."""

    sector: int | None = None  # the FFI footprint's sector (the notebook's `sector`)
    cameras: list[int] = field(default_factory=list)  # empty: all four
    ccds: list[int] = field(default_factory=list)  # empty: all four
    polygon: list[float] | None = None  # [ra1, dec1, ra2, dec2, ...] in degrees, ICRS
    cone: tuple[float, float, float] | None = None  # (ra, dec, radius) in degrees
    targets_file: Path | None = None  # TIC ids or target names, one a line
    urls_file: Path | None = None  # URLs, one a line, or a saved plan (ECSV)
    sectors: list[int] | None = None  # which sectors' products; None: all, as in the notebook
    products: list[str] = field(default_factory=lambda: ["lc"])
    collection: str = "TESS"  # obs_collection; keeps HLSPs (e.g. *_llc.fits) out
    # "middle": the middle exposure's polygon (by obs_id) of each camera/CCD; "composite": the first,
    # middle and last exposures' polygons, so pointing jitter loses no target near an edge.
    footprint: str = "middle"


@dataclass(slots=True)
class OutputSettings:
    out_dir: Path = Path("tessmirror-data")
    # "mast": tid/s0001/0000/0000/2515/5310/<file> as on archive.stsci.edu; "sector": s0001/<file>;
    # "flat": <file>. "mast" keeps every directory small, which parallel filesystems need.
    layout: str = "mast"
    state_dir: Path | None = None  # default: <out_dir>/.tessmirror
    fsync: bool = True  # fsync each file before its rename, and the manifest per batch


@dataclass(slots=True)
class FetchSettings:
    # Downloads in flight, in total: a number fixes it; AUTO measures the path and settles on what
    # it needs, never above `max_connections` (engine/fetch/autotune.py).
    concurrency: int | str = 8
    # The politeness cap of AUTO: 32 connections carry 1 Gbit/s at 4 MiB/s each; past that, an
    # archive shared by many users sees one client take an unfair share of its server slots.
    max_connections: int = 32
    # Connections per host; None: as many as `concurrency`. MAST serves every file from one host, so a
    # smaller number would silently cap --concurrency (16 downloads over 8 connections).
    per_host: int | None = None
    chunk_size: int = 256 * 1024
    connect_timeout: float = 30.0
    idle_timeout: float = 60.0  # no byte for this long ends the try; never a total timeout
    retries: int = 8  # tries per file beyond the first
    backoff_initial: float = 1.0
    backoff_max: float = 120.0
    bandwidth_limit: float | None = None  # bytes/s for the whole run; None: no cap
    max_redirects: int = 5
    token_env: str | None = "MAST_API_TOKEN"  # environment variable holding an archive token
    # access_estsize is rounded kB: accept |bytes - kB*1024| <= tolerance*bytes + 1024.
    est_size_tolerance: float = 0.05
    # A body is never allowed past this many bytes when the plan declares no size at all.
    max_file_size: int = 4 * 1024**3
    source: str = "mast"  # one of SOURCES
    s3_endpoint: str = S3_ENDPOINT  # the bucket's HTTPS endpoint (path-style: ENDPOINT/stpubdata/...)
    user_agent: str = "tessmirror/0.1 (+https://github.com/tessmirror)"

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
    level: VerifyLevel = VerifyLevel.FITS
    workers: int = 2  # threads for FITS checks (astropy releases the GIL in its checksums)


@dataclass(slots=True)
class RunSettings:
    progress_interval: float = 30.0  # seconds between plain log lines when not on a terminal
    force: bool = False  # skip the free-space preflight
    recheck: bool = False  # stat/verify files the manifest says are done
    refresh_plan: bool = False  # query TAP again even when a saved plan exists
    shard: str | None = None  # "K/N": download only shard K of N of the plan (job arrays; engine.shard)
    log_level: str = "INFO"


@dataclass(slots=True)
class ClusterSettings:
    """`tessmirror run --cluster ...`: where the downloads run (engine/cluster). The driver plans,
    holds the lock and writes the manifest; `jobs` workers each run one batch at a time with
    `job_concurrency` connections, so the archive sees at most jobs x job_concurrency."""

    mode: str | None = None  # None: in this process; "local", "slurm", "slurm-runner" or "tcp://HOST:PORT"
    jobs: int = 2  # Dask workers (Slurm jobs under slurm); each runs one batch at a time
    job_concurrency: int | None = None  # connections per job; None: fetch.concurrency (8 under auto)
    queue: str | None = None  # Slurm partition (--partition) of the worker jobs
    account: str | None = None  # Slurm account (--account) of the worker jobs
    walltime: str | None = None  # HH:MM:SS time limit of each worker job (dask-jobqueue's default: 30 min)
    job_extra: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--qos=debug"]
    job_cores: int = 2  # --cpus-per-task of a worker job (checksums and FITS checks use them)
    job_memory: str = "2GB"  # memory of a worker job (sbatch --mem)
    batch_files: int = 200  # files per batch (a batch is one Dask task)
    batch_bytes: int = 1_000_000_000  # declared bytes per batch, whichever limit comes first


@dataclass(slots=True)
class Settings:
    tap: TapSettings = field(default_factory=TapSettings)
    selection: Selection = field(default_factory=Selection)
    output: OutputSettings = field(default_factory=OutputSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    run: RunSettings = field(default_factory=RunSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @property
    def state_dir(self) -> Path:
        return self.output.state_dir or self.output.out_dir / ".tessmirror"
