"""A real single-node Slurm cluster (slurmctld + slurmd + munged on localhost) for tests.

Install the packages once with `.ci/slurm.sh install` (Debian, root). The `slurm_cluster`
fixture starts private daemons with a fresh state folder, yields a `SlurmCluster`, and stops
them (by PID) at the end of the session.

While the fixture is active, SLURM_CONF and PATH are set in os.environ, so submitit and
`hydra/launcher=submitit_slurm` work in-process. A subprocess (e.g. a Hydra multirun started
with subprocess.run) must get `env=cluster.env`: without SLURM_CONF the Slurm commands read
/etc/slurm/slurm.conf (absent), and without the PATH entry submitit cannot see job states.
sbatch exports the submitting environment to the jobs, so jobs inherit both.

Set SLURM_TEST_KEEP_STATE=1 to keep the state folder (logs, job files) after the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PARTITION = "debug"
REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
START_TIMEOUT_S = 30


@dataclass
class SlurmCluster:
    conf: Path
    state_dir: Path
    env: dict[str, str]  # full environment for subprocesses (os.environ + SLURM_CONF + PATH)
    partition: str = PARTITION
    cpus: int = 1
    mem_mb: int = 2000
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    def job_folder(self, name: str) -> Path:
        """A folder for submitit job files, inside the cluster's state folder."""
        folder = self.state_dir / "jobs" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def launcher_overrides(self, timeout_min: int = 5, cpus_per_task: int = 1, mem_gb: int = 1,
                           launcher: str = "submitit_slurm", tasks_per_node: int = 1) -> list[str]:
        """Hydra overrides that send a multirun to this cluster via hydra-submitit-launcher.

        `launcher` is the preset in conf/hydra/launcher/ ("submitit_slurm": the plugin's own;
        "slurm": the project's GPU preset, whose GPU count is cleared here: no GRES on this node).
        The process running Hydra needs this cluster's environment (see module docstring).
        """
        if tasks_per_node * min(cpus_per_task, self.cpus) > self.cpus:
            raise ValueError(f"{tasks_per_node} tasks do not fit on {self.cpus} CPUs")
        return [
            f"hydra/launcher={launcher}",
            f"hydra.launcher.partition={self.partition}",
            f"hydra.launcher.cpus_per_task={min(cpus_per_task, self.cpus)}",
            f"hydra.launcher.mem_gb={mem_gb}",
            f"hydra.launcher.timeout_min={timeout_min}",
            "hydra.launcher.nodes=1",
            "hydra.launcher.gpus_per_node=null",
            f"hydra.launcher.tasks_per_node={tasks_per_node}",
        ]

    def squeue(self) -> str:
        return _run(["squeue", "--states=all", "-o", "%i %j %T %M %R"], self.env)

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted(self.state_dir.glob("*.log")) + sorted(self.state_dir.glob("*.out")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} (last {len(text)} lines)\n" + "\n".join(text))
        return "\n".join(out)


# submitit reads job states with `sacct`, which needs slurmdbd (accounting). Without it sacct
# fails, states stay UNKNOWN, and a job killed before writing its result (scancel, OOM, hard
# timeout) makes job.result() wait forever. This stand-in answers what submitit asks for
# (`sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]`) from squeue, which keeps
# finished jobs for MinJobAge seconds.
SACCT_STANDIN = """#!/bin/sh
ids=
while [ $# -gt 0 ]; do
    case "$1" in
        -j|--jobs) ids="$ids,$2"; shift 2 ;;
        --jobs=*) ids="$ids,${1#--jobs=}"; shift ;;
        *) shift ;;  # -o/--format and --parsable2: the output is always JobID|State|NodeList
    esac
done
echo "JobID|State|NodeList"
exec squeue -h --states=all -o '%i|%T|%N' ${ids:+--jobs=${ids#,}}
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 10) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return res.stdout + res.stderr


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) / 1024 * 0.8)
    except (OSError, ValueError):
        pass
    return 2000


def _write_conf(state: Path, host: str, cpus: int, mem_mb: int, munge_socket: Path) -> Path:
    ctld_port, slurmd_port = _free_ports(2)
    conf = state / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=wetok-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# private munged socket; cred_expire=10 cuts the hold on requeued jobs (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# The periodic main scheduler pass (default every 60 s) is what starts a requeued job once its
# hold ends: backfill skips passes when nothing changed. 5 s keeps a requeue at about 15 s.
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
# keep finished jobs visible to squeue (and so to the sacct stand-in)
MinJobAge=3600
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def _stop(procs: dict[str, subprocess.Popen], timeout: float = 10) -> None:
    """TERM the daemons we started (by PID), wait, then KILL what is left."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _leftovers(conf: Path) -> list[int]:
    """PIDs of processes started from this cluster: their environment names our SLURM_CONF."""
    marker = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{cluster.log_tails()}")
        state = _run(["sinfo", "-h", "-N", "-o", "%T"], cluster.env).strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"Slurm node not idle after {START_TIMEOUT_S} s (sinfo: {state!r})\n{cluster.log_tails()}"
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [d for d in REQUIRED if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm not installed (missing {', '.join(missing)}): run `.ci/slurm.sh install`")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd and munged start as root)")

    # Always a fresh state folder: slurmctld replays the jobs it finds in an old one.
    state = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    state.chmod(0o755)  # munged (as user munge) must reach its socket folder
    for sub in ("ctld", "spool", "bin", "jobs"):
        (state / sub).mkdir()
    munge_dir = state / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o711)  # munged insists that everyone may traverse its socket folder
    shutil.chown(munge_dir, "munge", "munge")
    munge_socket = munge_dir / "munge.socket"

    host = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    mem_mb = _mem_mb()
    conf = _write_conf(state, host, cpus, mem_mb, munge_socket)
    sacct = state / "bin" / "sacct"
    sacct.write_text(SACCT_STANDIN)
    sacct.chmod(0o755)

    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    env = dict(os.environ, SLURM_CONF=str(conf), PATH=f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cluster = SlurmCluster(conf=conf, state_dir=state, env=env, cpus=cpus, mem_mb=mem_mb)

    def start(name: str, cmd: list[str], **kwargs) -> None:
        out = open(state / f"{name}.out", "wb")
        cluster.procs[name] = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, **kwargs,
        )
        out.close()

    try:
        start("munged", [
            "munged", "--foreground", f"--socket={munge_socket}",
            f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
            f"--seed-file={munge_dir}/munged.seed",
        ], user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + 10
        while not munge_socket.exists():
            if time.monotonic() > deadline or cluster.procs["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start\n{cluster.log_tails()}")
            time.sleep(0.1)
        start("slurmctld", ["slurmctld", "-D", "-f", str(conf)])
        start("slurmd", ["slurmd", "-D", "-f", str(conf)])
        _wait_idle(cluster)

        os.environ.update(SLURM_CONF=env["SLURM_CONF"], PATH=env["PATH"])
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if cluster.procs.get("slurmctld") and cluster.procs["slurmctld"].poll() is None:
            # Cancel leftover jobs first so slurmd can clean up their steps before it stops.
            _run(["scancel", f"--partition={PARTITION}"], env)
            deadline = time.monotonic() + 10
            active = ["squeue", "-h", "--states=RUNNING,COMPLETING,CONFIGURING", "-o", "%i"]
            while time.monotonic() < deadline and subprocess.run(
                active, env=env, capture_output=True, text=True, timeout=10
            ).stdout.strip():
                time.sleep(0.5)
        # stop in reverse start order: slurmd, slurmctld, munged
        _stop(dict(reversed(list(cluster.procs.items()))))
        stragglers = _leftovers(conf)
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if stragglers:
            print(f"slurm_cluster: killed leftover processes {stragglers}")
        if os.environ.get("SLURM_TEST_KEEP_STATE"):
            print(f"slurm_cluster: state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
