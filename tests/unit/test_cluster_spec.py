"""--cluster values, the executor registry, and Dask staying out of `import engine`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.cluster import ClusterSpec, check_memory, check_walltime, parse_mode, require_extra
from engine.cluster.executors import EXECUTORS, InProcessExecutor, build_executor
from engine.exceptions import ConfigError
from engine.settings import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("inprocess", "")),
        ("", ("inprocess", "")),
        ("local", ("local", "")),
        ("SLURM", ("slurm", "")),
        ("slurm-runner", ("slurm-runner", "")),
        ("tcp://10.0.0.5:8786", ("tcp", "tcp://10.0.0.5:8786")),
        ("tcp://login1.cluster.example.org:8786", ("tcp", "tcp://login1.cluster.example.org:8786")),
    ],
)
def test_cluster_values_parse(text: str | None, expected: tuple[str, str]) -> None:
    assert parse_mode(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "kubernetes",
        "tcp://example.org",
        "tcp://example.org:0",
        "tcp://example.org:99999",
        "http://example.org:1",
        3,
    ],
)
def test_a_bad_cluster_value_names_the_key_and_the_choices(text: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mode(text, key="--cluster")
    assert "--cluster" in str(caught.value) and "slurm-runner" in str(caught.value)


def test_walltime_and_memory_are_checked() -> None:
    assert check_walltime("04:00:00") == "04:00:00"
    assert check_walltime("1-12:00:00") == "1-12:00:00"
    assert check_walltime(None) is None
    with pytest.raises(ConfigError, match=r"cluster.walltime: '4h' is not HH:MM:SS"):
        check_walltime("4h")
    assert check_memory("2GB") == "2GB"
    with pytest.raises(ConfigError, match=r"cluster\.job_memory"):
        check_memory("lots")


def test_the_global_connection_count_is_jobs_times_job_concurrency() -> None:
    spec = ClusterSpec(mode="local", jobs=3, job_concurrency=4)
    assert spec.connections == 12
    assert "3 jobs x 4 connections = at most 12 connections" in spec.describe()


def test_without_the_extra_a_cluster_is_one_line_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("distributed", "dask_jobqueue"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    with pytest.raises(ConfigError) as caught:
        require_extra("local")
    message = str(caught.value)
    assert "pip install 'tessmirror[cluster]'" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"tessmirror\[cluster\]"):
        build_executor(ClusterSpec(mode="slurm"), Settings())
    require_extra("inprocess")  # today's pipeline needs nothing


def test_the_registry_names_every_mode_and_inprocess_is_todays_pipeline() -> None:
    assert set(EXECUTORS) == {"inprocess", "local", "slurm", "slurm-runner", "tcp"}
    settings = Settings()
    executor = build_executor(ClusterSpec(), settings)
    assert isinstance(executor, InProcessExecutor)
    assert executor.consumers(5) == 5


def test_import_engine_does_not_import_dask() -> None:
    code = (
        "import sys, engine, engine.cluster, engine.cluster.executors, engine.cluster.parts, engine.manager\n"
        "engine.mirror\n"
        "roots = ('dask', 'distributed', 'dask_jobqueue')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# -- the [cluster] table ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("jobs = 0", "cluster.jobs"),
        ("job_concurrency = 0", "cluster.job_concurrency"),
        ('walltime = "4 hours"', "cluster.walltime"),
        ('job_memory = "lots"', "cluster.job_memory"),
        ('job_extra = ["qos=debug"]', "cluster.job_extra"),
        ("batch_files = 0", "cluster.batch_files"),
        ("stall_timeout = 0", "cluster.stall_timeout"),
        ('stall_timeout = "soon"', "cluster.stall_timeout"),
        ('mode = "kubernetes"', "cluster.mode"),
        ("jobz = 2", "cluster.jobz"),
    ],
)
def test_a_bad_cluster_key_is_named(tmp_path, table: str, key: str) -> None:
    from engine.config import load_settings

    path = tmp_path / "c.toml"
    path.write_text(f"[selection]\nsector = 1\n[cluster]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(key)


def test_the_cluster_table_and_flags_make_the_spec(tmp_path) -> None:
    from engine.cluster import spec_from_settings
    from engine.config import load_settings

    path = tmp_path / "c.toml"
    path.write_text('[selection]\nsector = 1\n[cluster]\nmode = "local"\njobs = 3\njob_extra = ["--qos=x"]\n')
    settings = load_settings(path, {"cluster.job_concurrency": 4, "fetch.concurrency": "auto"})
    spec = spec_from_settings(settings)
    assert (spec.mode, spec.jobs, spec.job_concurrency, spec.job_extra) == ("local", 3, 4, ("--qos=x",))
    settings = load_settings(path, {"fetch.concurrency": "auto"})
    assert spec_from_settings(settings).job_concurrency == 8  # auto tunes in-process runs only
    settings = load_settings(path, {"fetch.concurrency": 5})
    assert spec_from_settings(settings).job_concurrency == 5


def test_a_cluster_and_a_shard_are_refused_together(tmp_path) -> None:
    from engine.config import load_settings

    with pytest.raises(ConfigError, match=r"^run\.shard: --shard and --cluster local"):
        load_settings(None, {"selection.sector": 1, "cluster.mode": "local", "run.shard": "0/2"})


def test_dask_jobqueue_is_imported_keeping_our_sigint_handler_and_refused_first_off_the_main_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import signal
    import threading

    from engine.cluster import import_extra

    for name in [n for n in sys.modules if n == "dask_jobqueue" or n.startswith("dask_jobqueue.")]:
        monkeypatch.delitem(sys.modules, name)
    outcome: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            import_extra("dask_jobqueue")
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(60)
    assert isinstance(outcome[0], ConfigError) and outcome[0].key == "cluster.mode"
    assert "main thread" in str(outcome[0])

    def ours(signum, frame):  # pragma: no cover - never called
        pass

    previous = signal.signal(signal.SIGINT, ours)
    try:
        import_extra("dask_jobqueue")  # its runner module sets a SIGINT handler of its own
        assert signal.getsignal(signal.SIGINT) is ours
    finally:
        signal.signal(signal.SIGINT, previous)


def test_jobs_default_to_two_or_to_the_allocations_worker_ranks_under_slurm_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.cluster import spec_from_settings

    settings = Settings()
    settings.cluster.mode = "local"
    assert spec_from_settings(settings).jobs == 2
    monkeypatch.setenv("SLURM_NTASKS", "6")  # scheduler, driver and 4 workers
    settings.cluster.mode = "slurm-runner"
    assert spec_from_settings(settings).jobs == 4
    settings.cluster.jobs = 2  # given: kept (fewer workers busy, gentler on the archive)
    assert spec_from_settings(settings).jobs == 2
