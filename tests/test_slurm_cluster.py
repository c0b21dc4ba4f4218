"""submitit jobs on the real local Slurm cluster of tests/slurm_cluster.py."""

import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# Jobs unpickle their function in a fresh Python that cannot import this test module
# (pytest puts tests/ on sys.path only in its own process): pickle its contents by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_sum(n: int) -> int:
    return sum(i * i for i in range(n))


class ResumableSquareSum(submitit.helpers.Checkpointable):
    """Sums i*i for i < n, one step per `delay_s`, keeping its progress in `workdir`.

    `workdir/progress` holds "next_i partial_sum"; `workdir/starts` gets one line per start
    with the step it started from.
    """

    def __init__(self, workdir: Path, n: int, delay_s: float) -> None:
        self.workdir, self.n, self.delay_s = Path(workdir), n, delay_s

    def __call__(self) -> int:
        progress = self.workdir / "progress"
        i, total = map(int, progress.read_text().split()) if progress.exists() else (0, 0)
        with open(self.workdir / "starts", "a") as f:
            f.write(f"{i}\n")
        while i < self.n:
            time.sleep(self.delay_s)
            total += i * i
            i += 1
            tmp = progress.with_suffix(".tmp")
            tmp.write_text(f"{i} {total}")
            tmp.replace(progress)  # atomic: an interrupt never leaves a half-written file
        return total

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # the state lives in workdir, so resubmitting self is enough
        return submitit.helpers.DelayedSubmission(self)


def wait_for(predicate, timeout_s: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{cluster.squeue()}")
        time.sleep(0.5)


def executor(cluster, name: str) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=cluster.job_folder(name) / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=cluster.partition, timeout_min=5, cpus_per_task=1, mem_gb=1)
    return ex


def test_function_job_returns_result(slurm_cluster):
    job = executor(slurm_cluster, "plain").submit(square_sum, 100)
    wait_for(lambda: job.done(force_check=True), 30, f"job {job.job_id}", slurm_cluster)
    assert job.result() == square_sum(100)
    # done() saw the result file; the Slurm state comes from the sacct stand-in
    wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "COMPLETED", 10,
             f"job {job.job_id} to be COMPLETED", slurm_cluster)


def test_cancelled_job_raises(slurm_cluster):
    # Without a working sacct, submitit would wait forever for this job's result.
    job = executor(slurm_cluster, "cancel").submit(time.sleep, 300)
    wait_for(lambda: job.watcher.get_state(job.job_id, mode="force") == "RUNNING", 30,
             f"job {job.job_id} to start", slurm_cluster)
    job.cancel()
    wait_for(lambda: job.done(force_check=True), 30, f"cancelled job {job.job_id}", slurm_cluster)
    job._results_timeout_s = 0  # submitit waits 15 s for a result file that shared filesystems may delay
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


def test_preempted_job_resumes_from_its_progress(slurm_cluster, tmp_path):
    n = 16
    local = tmp_path / "local"
    local.mkdir()
    expected = ResumableSquareSum(local, n, delay_s=0)()

    workdir = slurm_cluster.job_folder("preempt-work")
    job = executor(slurm_cluster, "preempt").submit(ResumableSquareSum(workdir, n, delay_s=0.5))
    progress = workdir / "progress"
    wait_for(lambda: progress.exists() and int(progress.read_text().split()[0]) >= 3, 30,
             "the job to make progress", slurm_cluster)
    job._interrupt()  # preemption as Slurm does it: SIGTERM, then submitit's USR2
    wait_for(lambda: job.done(force_check=True), 60, f"requeued job {job.job_id}", slurm_cluster)

    assert job.result() == expected
    starts = [int(s) for s in (workdir / "starts").read_text().split()]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < n, starts
