"""``score_slides_distributed``: one Dask task per slide, on this machine or a cluster.

The outputs and their meaning are those of :func:`~pathology.batch.score_slides`: every slide
writes only into ``OUT/<slide_id>/`` (``slide.json`` last), and the client rebuilds
``OUT/slides.csv`` / ``failures.csv`` after each slide and ``report.html`` at the end, with the
same helpers. Where the tasks run:

    cluster="local"      distributed.LocalCluster: n_workers processes, one slide each at a time
                         (on CUDA: SLIDES_PER_GPU processes per GPU)
    cluster="slurm"      dask_jobqueue.SLURMCluster from the config's ``slurm`` section
    cluster=ADDRESS      a running scheduler (``tcp://host:8786``) and its workers

``OUT`` must be one folder that the client and every worker see (a shared filesystem on a
cluster). Each task returns the slide's :class:`SlideOutcome`; the numbers depend only on the slide
and the settings, so they equal a serial run's.

Fault handling: a task that raises an unexpected error is retried (``max_retries``); a worker that
dies mid-slide (killed, out of memory, walltime) makes the scheduler run the slide elsewhere,
where it resumes from its tile store and finished shards. Every start of a slide is counted in
``OUT/.attempts-<run>/``; a slide is started at most ``1 + max_retries`` times and then reported as
failed. The count is ours, not the scheduler's ``KilledWorker`` count, because the scheduler also
blames the slides that merely waited in a dying worker's queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathology._io import write_text
from pathology.batch._api import (
    BatchProgress,
    BatchResult,
    SlideFailure,
    _one_line,
    finish_batch,
    write_batch_files,
)
from pathology.batch._manifest import SlideJob
from pathology.batch._slide import ScoreSettings, SlideOutcome, score_slide
from pathology.errors import ConfigError, OutputExistsError, PathologyError

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "ClusterInfo",
    "auto_cluster",
    "load_cluster_config",
    "score_slides_distributed",
    "slurm_kwargs",
    "slurm_scaling",
]

log = logging.getLogger(__name__)

#: What ``slurm_kwargs`` accepts in the config's ``slurm`` section (see scripts/slurm/cluster.yaml).
SLURM_KEYS = (
    "queue",
    "account",
    "cores",
    "memory",
    "walltime",
    "gpus",
    "gpu_type",
    "processes",
    "local_directory",
    "log_directory",
    "interface",
    "death_timeout",
    "job_name",
    "python",
    "job_script_prologue",
    "job_extra_directives",
    "worker_extra_args",
    "adapt",
)
CONFIG_KEYS = ("slurm", "dashboard_address")
#: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also switches off glibc's
#: adaptive mmap threshold: every large array then costs fresh pages, and a slide took ~1.6x as
#: long as in a plain process here. Local workers get glibc's defaults back (the setting unset);
#: SLURM worker jobs, whose nanny reads its own environment, get large fixed thresholds.
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(128 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
JOBQUEUE_MISSING = "--cluster slurm needs dask-jobqueue: pip install 'pathology[cluster]'"
#: Slides scored at once per GPU: worker processes per GPU, each scoring one slide. A slide's
#: CPU-only work (planning its tiles, the stain estimate, writing its outputs: ~4 s of a
#: 3,000-tile slide on the H100 box, more than the 2.6 s its tiles spent in nvJPEG decoding and
#: the model) then runs while the other slide's tiles go through the GPU, which one slide at a
#: time leaves idle. Two processes at batch 1024 peak at ~14 GB of GPU memory; a smaller GPU
#: halves the batch on out-of-memory errors.
SLIDES_PER_GPU = 2
#: Environment variable overriding :data:`SLIDES_PER_GPU` (e.g. 1 for an A/B on a GPU box).
SLIDES_PER_GPU_ENV = "PATHOLOGY_SLIDES_PER_GPU"


def slides_per_gpu() -> int:
    """:data:`SLIDES_PER_GPU`, or ``$PATHOLOGY_SLIDES_PER_GPU`` when set (a whole number >= 1)."""
    raw = os.environ.get(SLIDES_PER_GPU_ENV, "").strip()
    if not raw:
        return SLIDES_PER_GPU
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{SLIDES_PER_GPU_ENV}={raw!r}: expected a whole number of at least 1")
    return value


#: A task runs ``task_fn(job, out, settings, overwrite)`` on a worker; the default scores the slide.
TaskFn = Callable[[SlideJob, Path, ScoreSettings, bool], SlideOutcome]


@dataclass(frozen=True)
class ClusterInfo:
    """Where a distributed batch runs, handed to ``on_start`` before the first slide.

    Attributes
    ----------
    cluster : str
        ``local``, ``slurm`` or the scheduler address given.
    scheduler_address : str
    dashboard_link : str or None
        The Dask dashboard URL; None when the scheduler serves none (needs ``bokeh>=3.1``).
    workers : int
        Worker processes asked for (local), SLURM jobs asked for (or the adaptive maximum),
        or workers connected (address).
    gpu : bool
        Slide tasks ask for ``resources={"GPU": 1}``: each worker process declares one such slot
        and scores one slide at a time (local and SLURM: :data:`SLIDES_PER_GPU` per GPU).
    """

    cluster: str
    scheduler_address: str
    dashboard_link: str | None
    workers: int
    gpu: bool


@dataclass(frozen=True)
class _TaskPlan:
    """What every task needs besides its slide (sent to the workers with each task)."""

    out: str
    overwrite: bool
    attempts_dir: str
    max_attempts: int
    torch_threads: int | None
    #: GPUs per host to spread a host's worker processes over (0: leave CUDA_VISIBLE_DEVICES).
    pin_gpus: int


@dataclass(frozen=True)
class _TaskFailed:
    """A slide that failed on a worker with a deterministic (input) error: not retried."""

    reason: str
    error: BaseException | None
    traceback: str


# --------------------------------------------------------------------------------------------
# configuration


def load_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a cluster config YAML (``--cluster-config``), checking its top-level keys.

    Parameters
    ----------
    path : path
        A YAML file with an optional ``slurm:`` section (:func:`slurm_kwargs`) and an optional
        ``dashboard_address:`` (e.g. ``":8787"``, ``":0"`` for any free port).

    Raises
    ------
    ConfigError
        Missing or unreadable file, not a mapping, or unknown keys.
    """
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the cluster config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).split())
        raise ConfigError(f"{p}: not valid YAML ({text})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: expected a mapping with a 'slurm:' section, got {type(data).__name__}"
        )
    _check_keys(data, CONFIG_KEYS, str(p))
    return data


def _check_keys(section: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(str(k) for k in section if k not in known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )


def _slurm_section(config: Mapping[str, Any] | None) -> dict[str, Any]:
    section = (config or {}).get("slurm")
    if section is None:
        raise ConfigError(
            "--cluster slurm needs a cluster config with a 'slurm:' section "
            "(queue, cores, memory, walltime, gpus): see scripts/slurm/cluster.yaml"
        )
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"cluster config: 'slurm' must be a mapping, got {type(section).__name__}"
        )
    _check_keys(section, SLURM_KEYS, "cluster config 'slurm'")
    return dict(section)


def _int(section: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"cluster config 'slurm.{key}': expected an integer >= {minimum}, got {value!r}"
        )
    return value


def _str_list(section: Mapping[str, Any], key: str) -> list[str]:
    value = section.get(key) or []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"cluster config 'slurm.{key}': expected a list of strings, got {value!r}"
        )
    return list(value)


def slurm_kwargs(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of ``dask_jobqueue.SLURMCluster`` from the config's ``slurm`` section.

    Each SLURM job runs ``processes`` Dask worker processes (default: :data:`SLIDES_PER_GPU` per
    GPU, or 1), each with ONE thread: a worker scores one slide at a time, with
    ``cores // processes`` torch threads (and, on a GPU, as many tile-reading threads). The job
    still books ``cores`` CPUs (``job_cpu``); ``gpus`` adds ``#SBATCH --gres=gpu:[gpu_type:]N``
    and ``--resources GPU=1`` to every worker process (a slide task asks for ``GPU: 1``); the
    processes are spread evenly over the job's GPUs, ``processes / gpus`` slides per GPU.

    Parameters
    ----------
    config : mapping
        The cluster config (:func:`load_cluster_config`); its ``slurm`` section needs ``cores``
        and ``memory`` (per job, e.g. ``"64GB"``); optional: ``queue`` (partition), ``account``,
        ``walltime``, ``gpus`` (per job), ``gpu_type``, ``processes``, ``local_directory``,
        ``log_directory``, ``interface``, ``death_timeout``, ``job_name``, ``python``,
        ``job_script_prologue`` (module loads, venv activation), ``job_extra_directives``,
        ``worker_extra_args``; ``adapt`` is read by :func:`slurm_scaling`.

    Returns
    -------
    dict
        Ready for ``SLURMCluster(**kwargs)``; ``dask_jobqueue`` is not imported.

    Raises
    ------
    ConfigError
        No ``slurm`` section, unknown keys, missing cores/memory, bad values, ``processes``
        that is not a multiple of ``gpus``, or ``--resources`` in ``worker_extra_args`` (use
        ``gpus``).
    """
    s = _slurm_section(config)
    for key in ("cores", "memory"):
        if s.get(key) in (None, ""):
            raise ConfigError(
                f"cluster config 'slurm.{key}' is required (per SLURM job, e.g. cores: 8, "
                "memory: 64GB)"
            )
    cores = _int(s, "cores", None, 1)
    gpus = _int(s, "gpus", 0, 0) or 0
    processes = _int(s, "processes", gpus * slides_per_gpu() or 1, 1)
    assert cores is not None and processes is not None
    if gpus and processes % gpus:
        raise ConfigError(
            f"cluster config 'slurm': processes ({processes}) must be a multiple of gpus "
            f"({gpus}): the worker processes are spread evenly over the GPUs"
        )
    if processes > cores:
        raise ConfigError(
            f"cluster config 'slurm': processes ({processes}) is more than cores ({cores})"
        )
    worker_args = _str_list(s, "worker_extra_args")
    if any(a == "--resources" or a.startswith("--resources=") for a in worker_args):
        raise ConfigError(
            "cluster config 'slurm.worker_extra_args': do not pass --resources; set gpus "
            "(each worker process then declares GPU=1)"
        )
    directives = _str_list(s, "job_extra_directives")
    if gpus:
        kind = s.get("gpu_type")
        directives = [f"--gres=gpu:{kind + ':' if kind else ''}{gpus}", *directives]
        worker_args = [*worker_args, "--resources", "GPU=1"]
    kwargs: dict[str, Any] = {
        # One thread per worker process: a worker scores one slide at a time.
        "cores": processes,
        "processes": processes,
        # ... but the job books all its cores, for the worker's torch threads.
        "job_cpu": cores,
        "memory": str(s["memory"]),
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
        "job_script_prologue": [
            "export " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
            *_str_list(s, "job_script_prologue"),
        ],
    }
    for key in (
        "queue",
        "account",
        "walltime",
        "local_directory",
        "log_directory",
        "interface",
        "job_name",
        "python",
    ):
        if s.get(key) not in (None, ""):
            kwargs[key] = str(s[key])
    if s.get("death_timeout") is not None:
        kwargs["death_timeout"] = _int(s, "death_timeout", None, 1)
    dashboard = (config or {}).get("dashboard_address")
    if dashboard is not None:
        kwargs["scheduler_options"] = {"dashboard_address": str(dashboard)}
    return kwargs


def slurm_scaling(config: Mapping[str, Any] | None, n_jobs: int) -> dict[str, int]:
    """How many SLURM jobs to run: ``{"jobs": n_jobs}`` for ``cluster.scale(jobs=...)``, or the
    config's ``adapt: {minimum_jobs, maximum_jobs}`` for ``cluster.adapt(...)``.

    Raises
    ------
    ConfigError
        ``adapt`` is not a mapping of those two non-negative integers with minimum <= maximum.
    """
    s = _slurm_section(config)
    adapt = s.get("adapt")
    if adapt is None:
        if n_jobs < 1:
            raise ConfigError(f"SLURM jobs to start must be at least 1, got {n_jobs}")
        return {"jobs": int(n_jobs)}
    if not isinstance(adapt, Mapping):
        raise ConfigError(f"cluster config 'slurm.adapt': expected a mapping, got {adapt!r}")
    _check_keys(adapt, ("minimum_jobs", "maximum_jobs"), "cluster config 'slurm.adapt'")
    lo = _int(adapt, "minimum_jobs", 0, 0)
    hi = _int(adapt, "maximum_jobs", None, 1)
    if hi is None or lo is None or lo > hi:
        raise ConfigError(
            f"cluster config 'slurm.adapt': needs maximum_jobs >= 1 and minimum_jobs <= "
            f"maximum_jobs, got {dict(adapt)!r}"
        )
    return {"minimum_jobs": lo, "maximum_jobs": hi}


# --------------------------------------------------------------------------------------------
# worker side


def _score_one(job: SlideJob, out: Path, settings: ScoreSettings, overwrite: bool) -> SlideOutcome:
    """The default task: score one slide (no progress callbacks on a worker)."""
    return score_slide(job, out, settings, overwrite=overwrite)


def _pin_gpu(n_gpus: int) -> None:
    """Give this worker process one of the host's GPUs, chosen by the worker name's trailing number
    (LocalCluster: 0, 1, ...; dask-jobqueue with several processes per job: ``<job>-<i>``).

    Only before CUDA is initialised in the process (CUDA reads CUDA_VISIBLE_DEVICES once).
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [v.strip() for v in visible.split(",") if v.strip()]
        if visible is not None
        else [str(i) for i in range(n_gpus)]
    )
    if len(ids) <= 1:
        return
    from distributed import get_worker

    name = str(get_worker().name)
    match = re.search(r"(\d+)$", name)
    index = int(match.group(1)) if match else 0
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    log.info("worker %s: using GPU %s", name, os.environ["CUDA_VISIBLE_DEVICES"])


def _count_attempt(plan: _TaskPlan, job: SlideJob) -> int:
    """This start of the slide's task, counted in the shared output folder: 1, 2, ..."""
    out = Path(plan.out)
    if not out.is_dir():
        import socket

        raise ConfigError(
            f"{out}: the output folder is not visible on worker host {socket.gethostname()}; "
            "--out must be on a filesystem shared by the client and every worker"
        )
    path = Path(plan.attempts_dir) / job.slide_id
    try:
        n = int(path.read_text())
    except (OSError, ValueError):
        n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, f"{n + 1}\n")
    return n + 1


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def _run_task(
    task_fn: TaskFn, job: SlideJob, settings: ScoreSettings, plan: _TaskPlan
) -> SlideOutcome | _TaskFailed:
    """What a worker runs for one slide.

    Input errors (:class:`PathologyError`: a bad file, a missing mpp, results made with other
    settings) are deterministic, so they come back as a value and are not retried; any other
    exception propagates and the scheduler retries the task.
    """
    if plan.pin_gpus:
        _pin_gpu(plan.pin_gpus)
    if plan.torch_threads:
        import torch

        # The nanny starts workers with OMP_NUM_THREADS=1: give torch this worker's share.
        torch.set_num_threads(plan.torch_threads)
    try:
        attempt = _count_attempt(plan, job)
        # A finished slide is never refused: the scheduler reruns a task whose result died with
        # its worker before this client fetched it, and that rerun only reads slide.json.
        finished = (Path(plan.out) / job.slide_id / "slide.json").exists()
        if attempt > plan.max_attempts and not finished:
            return _TaskFailed(
                f"{job.path}: not scored: the worker process stopped (killed, out of memory, or "
                f"a crash) in each of {plan.max_attempts} attempts; see the Dask worker logs",
                None,
                "",
            )
        return task_fn(job, Path(plan.out), settings, plan.overwrite)
    except PathologyError as exc:
        return _TaskFailed(_one_line(exc, job), _picklable(exc), traceback.format_exc())


# --------------------------------------------------------------------------------------------
# client side


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def auto_cluster(workers: int, n_slides: int) -> str:
    """What ``pathology score --cluster auto`` runs: ``"local"`` (a LocalCluster of ``workers``
    processes, one slide each) for several slides with ``workers > 1``, else ``"none"`` (in this
    process, the slide's tiles read with ``workers`` threads)."""
    return "local" if workers > 1 and n_slides > 1 else "none"


def _local_plan(n_workers: int, gpus: int, cores: int) -> tuple[int, int]:
    """(worker processes, threads per process) of a LocalCluster: ``n_workers`` processes on the
    CPU; on ``gpus`` GPUs at most :func:`slides_per_gpu` per GPU. The cores are shared out
    evenly (torch threads, and on a GPU the slide's tile-reading threads)."""
    workers = min(n_workers, gpus * slides_per_gpu()) if gpus else n_workers
    return workers, max(1, cores // workers)


def _local_gpus(device: str) -> tuple[int, bool]:
    """(GPU slots, pin workers to GPUs) for a LocalCluster scoring on ``device``."""
    import torch

    from pathology.scoring._device import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return 0, False
    if dev.index is not None:  # cuda:N names one GPU: every worker would use it
        return 1, False
    return max(1, torch.cuda.device_count()), True


def _dashboard(client: Client) -> str | None:
    try:
        link = client.dashboard_link
    except (KeyError, AttributeError):  # the scheduler serves no dashboard (bokeh missing)
        return None
    return str(link) or None


def _looks_like_address(text: str) -> bool:
    return bool(re.match(r"^([a-z]+://)?[^\s:/]+(:\d+)?$", text) and ("://" in text or ":" in text))


def _start(
    cluster: str,
    n_workers: int,
    config: Mapping[str, Any] | None,
    settings: ScoreSettings,
    deaths_allowed: int,
    stack: contextlib.ExitStack,
) -> tuple[Client, ClusterInfo, int | None, int]:
    """Start or connect to the cluster; returns (client, info, torch threads, GPUs to pin)."""
    import dask
    from distributed import Client, LocalCluster

    config = config or {}
    # Read by a scheduler this process starts (local and slurm): a worker that dies while it
    # merely queued a slide must not count against that slide; our attempt count decides.
    stack.enter_context(
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": deaths_allowed,
                # Read by the nannies of a LocalCluster (None = do not set it): see MALLOC_ENV.
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
            }
        )
    )
    dashboard = str(config.get("dashboard_address", ":8787"))
    if cluster == "local":
        gpus, pin = _local_gpus(settings.device)
        workers, threads = _local_plan(n_workers, gpus, _cores())
        if gpus and workers < n_workers:
            log.warning(
                "%d workers asked for, but %d GPU(s): starting %d (%d slides per GPU at a time, "
                "%d threads each)",
                n_workers,
                gpus,
                workers,
                slides_per_gpu(),
                threads,
            )
        local = stack.enter_context(
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard,
                resources={"GPU": 1} if gpus else None,
            )
        )
        client = stack.enter_context(Client(local))
        info = ClusterInfo(
            "local", local.scheduler_address, _dashboard(client), workers, bool(gpus)
        )
        return client, info, threads, gpus if pin else 0
    if cluster == "slurm":
        kwargs = slurm_kwargs(config)
        scaling = slurm_scaling(config, n_workers)
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError(JOBQUEUE_MISSING) from None
        slurm = stack.enter_context(SLURMCluster(**kwargs))
        log.debug("SLURM worker job script:\n%s", slurm.job_script())
        if "jobs" in scaling:
            slurm.scale(jobs=scaling["jobs"])
        else:
            slurm.adapt(**scaling)
        client = stack.enter_context(Client(slurm))
        gpus = int(config["slurm"].get("gpus") or 0)
        info = ClusterInfo(
            "slurm",
            slurm.scheduler_address,
            _dashboard(client),
            scaling.get("jobs", scaling.get("maximum_jobs", 0)),
            gpus > 0,
        )
        threads = max(1, int(kwargs["job_cpu"]) // int(kwargs["processes"]))
        return client, info, threads, gpus
    if not _looks_like_address(cluster):
        raise ConfigError(
            f"--cluster {cluster!r}: expected local, slurm or a scheduler address such as "
            "tcp://host:8786"
        )
    try:
        client = stack.enter_context(Client(cluster, timeout="30s"))
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"--cluster {cluster}: cannot reach a Dask scheduler there ({' '.join(str(exc).split())}); "
            "start one with `dask scheduler`, or use --cluster local"
        ) from None
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    gpu = any("GPU" in (w.get("resources") or {}) for w in workers.values())
    info = ClusterInfo(cluster, cluster, _dashboard(client), len(workers), gpu)
    # The workers were started by someone else: their threads and GPUs are theirs to set.
    return client, info, None, 0


def _prepare_out(out: str | os.PathLike[str]) -> Path:
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root}: exists and is not a folder; choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _check_ids(jobs: Sequence[SlideJob]) -> None:
    seen: set[str] = set()
    for job in jobs:
        if job.slide_id in seen:
            # Two tasks writing one slide folder at once would corrupt it.
            raise ConfigError(
                f"slide_id {job.slide_id!r} appears twice; slide ids must be unique in a batch"
            )
        seen.add(job.slide_id)


def _killed_reason(job: SlideJob, exc: BaseException) -> str:
    deaths = getattr(exc, "allowed_failures", None)
    times = f"{deaths + 1} times " if isinstance(deaths, int) else ""
    return (
        f"{job.path}: not scored: workers holding this slide died {times}(killed, out of "
        "memory, or a crash); see the Dask worker logs"
    )


def score_slides_distributed(
    jobs: Sequence[SlideJob],
    out: str | os.PathLike[str],
    settings: ScoreSettings | None = None,
    *,
    cluster: str = "local",
    n_workers: int = 2,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: BatchProgress | None = None,
    on_error: Callable[[SlideJob, BaseException], None] | None = None,
    max_retries: int = 2,
    on_start: Callable[[ClusterInfo], None] | None = None,
    task_fn: TaskFn | None = None,
) -> BatchResult:
    """Score ``jobs`` into ``out`` with one Dask task per slide; outputs as :func:`score_slides`.

    Parameters
    ----------
    jobs : sequence of SlideJob
        Slide ids must be unique.
    out : path
        Output folder (created); on a cluster, a folder every worker sees at the same path.
    settings : ScoreSettings
        As for ``score_slides``; on the CPU workers score with ``workers=1`` (one process per
        slide, the parallelism is across slides); on GPUs with ``workers`` = the process's
        threads (tile-reading threads feeding the GPU). Either gives the same numbers.
    cluster : str
        ``"local"`` (a LocalCluster of ``n_workers`` processes), ``"slurm"`` (SLURM jobs from
        ``config["slurm"]``, needs dask-jobqueue) or a scheduler address (``tcp://host:8786``).
    n_workers : int
        Local worker processes (on CUDA at most :data:`SLIDES_PER_GPU` per GPU), or SLURM jobs
        to start (unless ``config["slurm"]["adapt"]`` is given). Unused with an address.
    config : mapping, optional
        The cluster config (:func:`load_cluster_config`).
    overwrite : bool
        Replace slides' results made with other settings (otherwise such a slide fails).
    progress : BatchProgress, optional
        ``slide_started`` then ``slide_finished`` are called when a slide's result reaches this
        process (a worker's start is not seen here); no stage or tile events.
    on_error : callable(job, exception), optional
        Called for every failed slide.
    max_retries : int
        Extra starts of a slide after its worker died or an unexpected error: a slide is
        started at most ``1 + max_retries`` times, then reported as failed.
    on_start : callable(ClusterInfo), optional
        Called once the cluster is up, before any slide (the CLI prints the dashboard link).
    task_fn : callable(job, out, settings, overwrite) -> SlideOutcome, optional
        What a worker runs per slide; default :func:`score_slide`. Must be importable on the
        workers (a module-level function).

    Returns
    -------
    BatchResult
        ``done`` and ``failures`` in the order of ``jobs``.

    Raises
    ------
    ConfigError
        Unknown cluster, bad config, dask-jobqueue missing for ``slurm``, an unreachable
        scheduler, duplicate slide ids, ``n_workers < 1`` or ``max_retries < 0``.
    """
    from distributed import as_completed

    from pathology import __version__

    settings = settings or ScoreSettings()
    if n_workers < 1:
        raise ConfigError(f"workers must be at least 1, got {n_workers}")
    if max_retries < 0:
        raise ConfigError(f"max_retries must be 0 or more, got {max_retries}")
    _check_ids(jobs)
    root = _prepare_out(out)
    provenance: dict[str, Any] = {
        "software": f"pathology {__version__}",
        "model": settings.model,
        "target_mpp": settings.target_mpp,
        "tile_px": settings.tile_px,
        "device_requested": settings.device,
    }
    result = BatchResult(out=root)
    run = uuid.uuid4().hex[:8]
    attempts_dir = root / f".attempts-{run}"
    order = {job.slide_id: i for i, job in enumerate(jobs)}
    try:
        if jobs:
            attempts_dir.mkdir()
            with contextlib.ExitStack() as stack:
                client, info, threads, pin = _start(
                    cluster, n_workers, config, settings, 10 * (max_retries + 1), stack
                )
                provenance["cluster"] = f"{info.cluster} ({info.scheduler_address})"
                log.info(
                    "Dask scheduler %s, dashboard %s",
                    info.scheduler_address,
                    info.dashboard_link or "not served (needs bokeh>=3.1 on the scheduler)",
                )
                if on_start is not None:
                    on_start(info)
                plan = _TaskPlan(
                    out=str(root.resolve()),
                    overwrite=overwrite,
                    attempts_dir=str(attempts_dir.resolve()),
                    max_attempts=1 + max_retries,
                    torch_threads=threads,
                    pin_gpus=pin,
                )
                # One slide per worker process: on the CPU it reads and scores with one thread
                # (the parallelism is across slides); on a GPU it reads with the process's
                # share of the cores, as the GPU takes tiles far faster than one thread decodes.
                reading = threads if info.gpu and threads else 1
                worker_settings = replace(settings, workers=reading)
                futures = {
                    client.submit(
                        _run_task,
                        task_fn or _score_one,
                        job,
                        worker_settings,
                        plan,
                        key=f"pathology-score-{run}-{i}",
                        retries=max_retries,
                        resources={"GPU": 1} if info.gpu else None,
                    ): job
                    for i, job in enumerate(jobs)
                }
                for n_done, future in enumerate(as_completed(futures)):
                    job = futures[future]
                    outcome = _collect(future, job, on_error)
                    future.release()
                    if isinstance(outcome, SlideOutcome):
                        result.done.append(outcome)
                    else:
                        result.failures.append(outcome)
                    write_batch_files(root, result.failures, provenance)
                    if progress is not None:
                        progress.slide_started(n_done, len(jobs), job)
                        progress.slide_finished(job, outcome)
    finally:
        shutil.rmtree(attempts_dir, ignore_errors=True)
    result.done.sort(key=lambda o: order[o.slide_id])
    result.failures.sort(key=lambda f: order[f.slide_id])
    finish_batch(result, provenance)
    return result


def _collect(
    future: Any, job: SlideJob, on_error: Callable[[SlideJob, BaseException], None] | None
) -> SlideOutcome | SlideFailure:
    """One finished task as the slide's outcome or failure (with its one-line reason)."""
    from distributed import KilledWorker

    error: BaseException
    try:
        value = future.result()
    except KilledWorker as exc:
        error, reason = exc, _killed_reason(job, exc)
        log.debug("slide %s: %s", job.slide_id, exc)
    except Exception as exc:  # an unexpected error, after the retries
        error, reason = exc, _one_line(exc, job)
        log.debug("slide %s failed:\n%s", job.slide_id, traceback.format_exc())
    else:
        if isinstance(value, SlideOutcome):
            return value
        error = value.error or PathologyError(value.reason)
        reason = value.reason
        log.debug("slide %s failed on a worker:\n%s", job.slide_id, value.traceback)
    if on_error is not None:
        on_error(job, error)
    return SlideFailure(job.slide_id, str(job.path), job.marker, reason)
