"""``score_slides_distributed``: Dask distributed gives the serial run's results, survives a
worker killed mid-slide, and reports a slide that keeps killing its worker.

Four small synthetic slides are scored once serially (module fixture); the distributed runs use
LocalClusters of two worker processes. The SLURM config mapping is tested as a pure function,
without dask-jobqueue.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pathology.batch import ScoreSettings, SlideJob, SlideOutcome, score_slide, score_slides
from pathology.batch._cluster import (
    JOBQUEUE_MISSING,
    ClusterInfo,
    load_cluster_config,
    score_slides_distributed,
    slurm_kwargs,
    slurm_scaling,
)
from pathology.errors import ConfigError


def _local_workers(asked: int) -> tuple[int, bool]:
    """(workers, gpu) of a local cluster under the default device (auto): two workers per GPU
    where CUDA is visible, else as asked."""
    import torch

    if torch.cuda.is_available():
        return min(asked, 2 * torch.cuda.device_count()), True
    return asked, False


SIZE = 1536  # px at 0.5 um/px: ~30 tissue tiles, one shard, ~1-3 s per slide on one core
SLIDES = {
    "p16-pos": ("p16_positive", "p16"),
    "p16-neg": ("p16_negative", "p16"),
    "pdl1-ge20": ("pdl1_cps_ge20", "pdl1"),
    "pdl1-1-19": ("pdl1_cps_1_19", "pdl1"),
}
REPO = Path(__file__).resolve().parents[1]
LOCAL = {"dashboard_address": ":0"}  # any free port: tests may run beside a real dashboard


def _rows(out: Path, drop: tuple[str, ...] = ("seconds",)) -> dict[str, dict[str, str]]:
    with (out / "slides.csv").open(newline="") as fh:
        return {
            r["slide_id"]: {k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)
        }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four synthetic slides and their serial ``score_slides`` results."""
    from pathology.synth import SynthParams, synthesize_slide

    root = tmp_path_factory.mktemp("cluster")
    (root / "slides").mkdir()
    jobs = []
    for seed, (sid, (preset, marker)) in enumerate(SLIDES.items(), start=41):
        path = root / "slides" / f"{sid}.svs"
        params = SynthParams.preset(preset, width=SIZE, height=SIZE, mpp=0.5, seed=seed)
        synthesize_slide(params, path, overwrite=True)
        jobs.append(SlideJob(sid, path, marker))
    serial = score_slides(jobs, root / "serial", ScoreSettings(workers=1))
    assert serial.ok, serial.failures
    return {"root": root, "jobs": jobs, "serial": root / "serial"}


class _Recorder:
    def __init__(self) -> None:
        self.started: list[tuple[int, int, str]] = []
        self.finished: list[str] = []

    def slide_started(self, index: int, total: int, job: SlideJob) -> None:
        self.started.append((index, total, job.slide_id))

    def stage(self, job: SlideJob, name: str) -> None:  # pragma: no cover - not sent
        raise AssertionError("no stage events in distributed runs")

    def tiles(self, done: int, total: int) -> None:  # pragma: no cover - not sent
        raise AssertionError("no tile events in distributed runs")

    def slide_finished(self, job: SlideJob, outcome: Any) -> None:
        self.finished.append(job.slide_id)


def test_local_cluster_matches_serial_run(cohort: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "dist"
    infos: list[ClusterInfo] = []
    bars = _Recorder()
    result = score_slides_distributed(
        cohort["jobs"],
        out,
        ScoreSettings(),  # workers=2 here; each worker scores its slide with workers=1
        cluster="local",
        n_workers=2,
        config=LOCAL,
        progress=bars,
        on_start=infos.append,
    )
    assert result.ok, result.failures
    assert [o.slide_id for o in result.done] == list(SLIDES)  # job order, not finishing order
    assert not any(o.reused for o in result.done)
    assert _rows(out) == _rows(cohort["serial"])
    assert (out / "report.html").stat().st_size > 0 and not (out / "failures.csv").exists()
    assert not list(out.glob(".attempts-*"))  # the run's attempt counts are removed
    (info,) = infos
    assert info.cluster == "local" and (info.workers, info.gpu) == _local_workers(2)
    assert info.scheduler_address.startswith("tcp://")
    assert sorted(bars.finished) == sorted(SLIDES)
    assert [(i, n) for i, n, _ in bars.started] == [(i, 4) for i in range(4)]
    cohort["dist"] = out


def _pid_log(out: Path, slide_id: str) -> list[int]:
    path = out / ".pids" / slide_id
    return [int(v) for v in path.read_text().split()] if path.exists() else []


def kill_or_score(
    job: SlideJob, out: Path, settings: ScoreSettings, overwrite: bool
) -> SlideOutcome:
    """Test task: logs its worker's pid per start; the ``poison`` slide kills its worker."""
    (out / ".pids").mkdir(exist_ok=True)
    with (out / ".pids" / job.slide_id).open("a") as fh:
        fh.write(f"{os.getpid()}\n")
    if job.slide_id == "poison":
        os.kill(os.getpid(), signal.SIGKILL)
    return score_slide(job, out, settings, overwrite=overwrite)


def test_killed_worker_loses_nothing_and_poison_is_reported(
    cohort: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "faults"
    victim = "pdl1-ge20"  # third job: the first two are finished or under way when it is killed
    jobs = [*cohort["jobs"], SlideJob("poison", cohort["jobs"][0].path, "p16")]
    seen: dict[str, Any] = {}

    def killer() -> None:
        # SIGKILL the worker process scoring the victim once it has tiled the slide and
        # estimated its stains (work/stains.json), i.e. mid-slide.
        deadline = time.monotonic() + 120
        marker = out / victim / "work" / "stains.json"
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.01)
        pids = _pid_log(out, victim)
        if not marker.exists() or not pids:
            return
        seen["finished"] = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/slide.json")}
        os.kill(pids[-1], signal.SIGKILL)
        seen["killed"] = pids[-1]

    watcher = threading.Thread(target=killer, daemon=True)
    failed: list[tuple[str, BaseException]] = []
    result = score_slides_distributed(
        jobs,
        out,
        ScoreSettings(),
        cluster="local",
        n_workers=2,
        config=LOCAL,
        max_retries=2,
        on_error=lambda job, exc: failed.append((job.slide_id, exc)),
        on_start=lambda info: watcher.start(),
        task_fn=kill_or_score,
    )
    watcher.join(5)
    assert "killed" in seen, "the victim slide finished before it could be killed"
    # The killed slide was started again on another worker process and finished with the serial
    # run's numbers; every slide finished before the kill kept its results untouched. (A third
    # start happens when the poison kills the worker holding the victim's finished result before
    # the client fetched it: that rerun only reads slide.json.)
    starts = {sid: _pid_log(out, sid) for sid in [*SLIDES, "poison"]}
    assert starts[victim][0] == seen["killed"] and len(starts[victim]) >= 2, (seen, starts)
    rows = _rows(out)
    assert {k: rows[k] for k in SLIDES} == _rows(cohort["serial"])
    for sid, mtime in seen["finished"].items():
        assert (out / sid / "slide.json").stat().st_mtime_ns == mtime, sid
    assert [o.slide_id for o in result.done] == list(SLIDES)
    assert not (out / victim / "work").exists()
    # The poisoned slide killed its worker at each of its 1 + max_retries starts, then failed
    # with one line naming the file; nothing else failed.
    assert len(_pid_log(out, "poison")) == 3
    (failure,) = result.failures
    assert failure.slide_id == "poison" and "\n" not in failure.error
    assert failure.error.startswith(str(jobs[0].path)) and "3 attempts" in failure.error
    assert [sid for sid, _ in failed] == ["poison"]
    with (out / "failures.csv").open(newline="") as fh:
        assert [r["slide_id"] for r in csv.DictReader(fh)] == ["poison"]
    assert "poison" not in rows


def test_scheduler_address_reuses_finished_slides(cohort: dict[str, Any]) -> None:
    """An address connects to a running scheduler; a rerun into a finished folder recomputes
    nothing and rewrites the same slides.csv."""
    from distributed import LocalCluster

    out = cohort.get("dist")
    if out is None:
        pytest.skip("needs test_local_cluster_matches_serial_run's folder")
    before = (out / "slides.csv").read_text()
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        infos: list[ClusterInfo] = []
        result = score_slides_distributed(
            cohort["jobs"], out, cluster=cluster.scheduler_address, on_start=infos.append
        )
    assert result.ok and all(o.reused for o in result.done)
    assert (out / "slides.csv").read_text() == before
    assert infos[0].cluster == cluster.scheduler_address and infos[0].workers == 1


# ---------------------------------------------------------------------------------------------
# configuration (no cluster started)

SLURM = {
    "slurm": {
        "queue": "gpu",
        "account": "lab",
        "cores": 16,
        "memory": "128GiB",
        "walltime": "04:00:00",
        "gpus": 2,
        "gpu_type": "a100",
        "local_directory": "$TMPDIR",
        "job_script_prologue": ["module load cuda", "source venv/bin/activate"],
        "job_extra_directives": ["--constraint=ib"],
        "worker_extra_args": ["--lifetime", "230m"],
    },
    "dashboard_address": ":8799",
}


def test_slurm_kwargs_map_the_config() -> None:
    kw = slurm_kwargs(SLURM)
    assert kw == {
        "cores": 4,  # one thread per worker process ...
        "processes": 4,  # ... two processes per GPU (one slide each) ...
        "job_cpu": 16,  # ... and the job still books all its cores
        "memory": "128GiB",
        "queue": "gpu",
        "account": "lab",
        "walltime": "04:00:00",
        "local_directory": "$TMPDIR",
        "job_script_prologue": [
            "export MALLOC_TRIM_THRESHOLD_=134217728 MALLOC_MMAP_THRESHOLD_=33554432",
            "module load cuda",
            "source venv/bin/activate",
        ],
        "job_extra_directives": ["--gres=gpu:a100:2", "--constraint=ib"],
        "worker_extra_args": ["--lifetime", "230m", "--resources", "GPU=1"],
        "scheduler_options": {"dashboard_address": ":8799"},
    }
    cpu = slurm_kwargs({"slurm": {"cores": 4, "memory": "16GB"}})
    assert cpu["processes"] == 1 and cpu["cores"] == 1 and cpu["job_cpu"] == 4
    assert cpu["job_extra_directives"] == [] and cpu["worker_extra_args"] == []
    assert slurm_scaling(SLURM, 3) == {"jobs": 3}
    adaptive = {"slurm": {**SLURM["slurm"], "adapt": {"maximum_jobs": 8}}}
    assert slurm_scaling(adaptive, 3) == {"minimum_jobs": 0, "maximum_jobs": 8}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"cores": 8}, "'slurm.memory' is required"),
        ({"cores": 8, "memory": "8GB", "partition": "gpu"}, "unknown key(s) partition"),
        ({"cores": 8, "memory": "8GB", "gpus": 2, "processes": 3}, "must be a multiple of gpus"),
        ({"cores": "8", "memory": "8GB"}, "'slurm.cores': expected an integer"),
        ({"cores": 8, "memory": "8GB", "job_script_prologue": "module load x"}, "list of strings"),
        ({"cores": 8, "memory": "8GB", "worker_extra_args": ["--resources", "GPU=2"]}, "set gpus"),
    ],
)
def test_slurm_kwargs_reject_bad_config(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slurm_kwargs({"slurm": section})


def test_slurm_scaling_rejects_bad_adapt() -> None:
    with pytest.raises(ConfigError, match="maximum_jobs"):
        slurm_scaling({"slurm": {"cores": 1, "memory": "1GB", "adapt": {"minimum_jobs": 2}}}, 1)


def test_example_config_is_valid() -> None:
    config = load_cluster_config(REPO / "scripts" / "slurm" / "cluster.yaml")
    kw = slurm_kwargs(config)
    assert kw["job_extra_directives"][0] == "--gres=gpu:1"
    assert kw["worker_extra_args"][-2:] == ["--resources", "GPU=1"]
    assert "sbatch" in (REPO / "scripts" / "slurm" / "score_cohort.sbatch").read_text()


def test_load_cluster_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("slurm: {cores: 1}\nworkers: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_cluster_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "missing.yaml")


def test_slurm_without_dask_jobqueue_says_how_to_install(
    cohort: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        score_slides_distributed(cohort["jobs"], tmp_path / "o", cluster="slurm", config=SLURM)
    assert str(err.value) == JOBQUEUE_MISSING
    assert not list((tmp_path / "o").glob(".attempts-*"))


def record_workers_and_score(
    job: SlideJob, out: Path, settings: ScoreSettings, overwrite: bool
) -> SlideOutcome:
    """Test task: notes the reading threads (``settings.workers``) the slide was given."""
    (out / ".workers").mkdir(exist_ok=True)
    (out / ".workers" / job.slide_id).write_text(f"{settings.workers}\n")
    return score_slide(job, out, settings, overwrite=overwrite)


@pytest.mark.parametrize(
    ("asked", "gpus", "cores", "plan"),
    [
        (2, 0, 2, (2, 1)),  # CPU: the processes asked for, the cores shared out
        (16, 0, 16, (16, 1)),
        (16, 1, 16, (2, 8)),  # one GPU: two slides at a time, 8 threads each
        (16, 2, 16, (4, 4)),
        (1, 1, 16, (1, 16)),  # one process asked for: it gets every core
        (3, 1, 2, (2, 1)),
    ],
)
def test_local_plan_two_slides_per_gpu(
    asked: int, gpus: int, cores: int, plan: tuple[int, int]
) -> None:
    from pathology.batch._cluster import SLIDES_PER_GPU, _local_plan

    assert SLIDES_PER_GPU == 2
    assert _local_plan(asked, gpus, cores) == plan


def test_slides_per_gpu_can_be_set_for_an_a_b(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathology.batch._cluster import _local_plan

    monkeypatch.setenv("PATHOLOGY_SLIDES_PER_GPU", "1")
    assert _local_plan(16, 1, 16) == (1, 16)
    assert slurm_kwargs({"slurm": {"cores": 8, "memory": "8GB", "gpus": 2}})["processes"] == 2
    monkeypatch.setenv("PATHOLOGY_SLIDES_PER_GPU", "two")
    with pytest.raises(ConfigError, match="PATHOLOGY_SLIDES_PER_GPU='two': expected a whole"):
        _local_plan(16, 1, 16)


def test_gpu_workers_read_with_their_share_of_the_cores(
    cohort: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a (here pretended) one-GPU, 8-core box with --workers 16: two worker processes, each
    scoring one slide at a time with 4 tile-reading threads (not one, as on the CPU), and the
    serial run's numbers. The model still runs where ``settings.device`` says (the CPU here)."""
    import pathology.batch._cluster as cl

    monkeypatch.setattr(cl, "_local_gpus", lambda device: (1, False))
    monkeypatch.setattr(cl, "_cores", lambda: 8)
    jobs = cohort["jobs"][:2]
    out = tmp_path / "gpu"
    infos: list[ClusterInfo] = []
    result = score_slides_distributed(
        jobs,
        out,
        ScoreSettings(device="cpu", workers=16),
        cluster="local",
        n_workers=16,
        config=LOCAL,
        on_start=infos.append,
        task_fn=record_workers_and_score,
    )
    assert result.ok, result.failures
    assert (infos[0].workers, infos[0].gpu) == (2, True)
    assert {p.name: p.read_text() for p in (out / ".workers").iterdir()} == {
        j.slide_id: "4\n" for j in jobs
    }
    serial = _rows(cohort["serial"])
    assert _rows(out) == {j.slide_id: serial[j.slide_id] for j in jobs}


@pytest.mark.parametrize(
    ("cluster", "jobs_dup", "message"),
    [
        ("slurmm", False, "expected local, slurm or a scheduler address"),
        ("local", True, "appears twice"),
    ],
)
def test_bad_cluster_or_duplicate_ids(
    cohort: dict[str, Any], tmp_path: Path, cluster: str, jobs_dup: bool, message: str
) -> None:
    jobs = cohort["jobs"][:1] * (2 if jobs_dup else 1)
    with pytest.raises(ConfigError, match=message):
        score_slides_distributed(jobs, tmp_path / "o", cluster=cluster)


def test_score_command_runs_several_slides_on_a_local_cluster_by_default(
    cohort: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pathology score --manifest` with --workers 2 (the default) and several slides: one Dask
    task per slide on a LocalCluster, the dashboard printed, the same slides.csv as serial."""
    from pathology.cli import main

    manifest = tmp_path / "m.csv"
    lines = ["path,marker,slide_id"] + [f"{j.path},{j.marker},{j.slide_id}" for j in cohort["jobs"]]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cli"
    assert main(["score", "--manifest", str(manifest), "--out", str(out), "--no-geojson"]) == 0
    err = capsys.readouterr().err
    assert f"Dask local cluster, {_local_workers(2)[0]} workers; dashboard:" in err
    assert _rows(out) == _rows(cohort["serial"])
