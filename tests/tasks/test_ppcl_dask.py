"""PPCL's per-interval students on a real Dask cluster (two single-thread worker processes on 127.0.0.1, with the
project on PYTHONPATH, started from another directory): `run_jobs` with the cluster's executor returns what the
local path returns, computed on the workers, from a teacher named by paths relative to the project root; a worker
killed mid-job is an error naming the job's interval and saying to run again."""
import os
import signal

import pytest
from distillery.core.errors import DistilleryError
from distillery.ppcl.adapter import trace
from distillery.ppcl.capture import split_call
from distillery.ppcl.depth import DistillConfig
from distillery.ppcl.digits_hf import build_digits_denoiser
from distillery.ppcl.hf import adapter_for
from distillery.ppcl.source import write_source
from distillery.ppcl.students import WorkerLostError, jobs, run_jobs

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tiny teacher saved as the ppcl_teacher stage saves it: source.json with a project-relative path; the
    jobs are built from the project root (the stage's cwd)."""
    denoiser = build_digits_denoiser(width=0.5, depth=5, seed=0)
    denoiser.transformer.save_pretrained(tmp_path / "models/ppcl/teacher/transformer")
    write_source(tmp_path / "models/ppcl/teacher", {"kind": "digits", "path": "models/ppcl/teacher",
                                                    "subfolder": "transformer"})
    model = denoiser.transformer.eval()
    x, t, tokens = denoiser.example_inputs(16)
    tr = trace(model, adapter_for(model), split_call(denoiser.model_inputs(x, t, tokens)))
    monkeypatch.chdir(tmp_path)
    return tr


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Two worker processes (the scheduler in this one, which gives up on a task at its first killed worker)."""
    import dask
    from distributed import Client, LocalCluster
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    (tmp_path / "elsewhere").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path / "elsewhere")  # the workers start in another directory than the stage's
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            lc = LocalCluster(processes=True, host="127.0.0.1", n_workers=2, threads_per_worker=1,
                              dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0")
    finally:
        os.chdir(cwd)
    client = Client(lc, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        lc.close()


def test_students_train_on_dask_workers_as_they_do_locally(project, cluster):
    cfg = DistillConfig(steps=2, batch_size=8)
    all_jobs = jobs("models/ppcl/teacher", project, [(0, 2), (2, 4)], [(1, 3)], cfg)
    assert all(os.path.isabs(j["teacher"]) and os.path.isabs(j["root"]) for j in all_jobs)
    worker_pids = set(cluster.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert all(cwd != os.getcwd() for cwd in cluster.run(os.getcwd).values())

    remote = run_jobs(all_jobs, workers=2, executor=cluster.get_executor(pure=False))
    local = run_jobs(all_jobs, workers=1)

    assert [r["kind"] for r in remote] == [r["kind"] for r in local] == ["interval", "interval", "sequential"]
    assert {r["pid"] for r in remote} <= worker_pids and {r["pid"] for r in local} == {os.getpid()}
    for r, l in zip(remote, local):
        assert set(r) == set(l) and set(r["results"]) == set(l["results"])
        for iv, (state, initial, final) in r["results"].items():
            lstate = l["results"][iv][0]
            assert set(state) == set(lstate)
            assert all(state[k].shape == lstate[k].shape and state[k].device.type == "cpu" for k in state)
            assert isinstance(initial, float) and isinstance(final, float)


def test_a_killed_worker_is_an_error_naming_the_interval(project, cluster):
    import threading
    all_jobs = jobs("models/ppcl/teacher", project, [(0, 2)], [], DistillConfig(steps=100_000, batch_size=8))
    pids = cluster.run(os.getpid)
    executor = cluster.get_executor(pure=False)

    def kill_when_running():
        import time
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [w for w, tasks in cluster.processing().items() if tasks]
            if busy:
                os.kill(pids[busy[0]], signal.SIGKILL)
                return
            time.sleep(0.1)
    threading.Thread(target=kill_when_running, daemon=True).start()
    with pytest.raises(WorkerLostError, match="interval 0_2.*run it again") as err:
        run_jobs(all_jobs, workers=2, executor=executor)
    assert isinstance(err.value, DistilleryError)
