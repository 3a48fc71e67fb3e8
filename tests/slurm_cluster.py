"""A real, private Slurm cluster on this machine, for tests.

Debian's munged, slurmctld and slurmd run from a temp dir with their own ports, key and state:
N slurmd daemons (`slurmd -N bsnodeK`) on one host, each with its own Port and NodeAddr=127.0.0.1,
so a job can span "two nodes" without DNS changes. Job ids start at a random number, because the
launch scripts derive MASTER_PORT from the job id and concurrent test clusters must not collide.
Only the daemons started here are stopped (by pid), after every job of this cluster has been
cancelled so that no slurmstepd outlives it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch")
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def ensure_slurm_installed() -> str | None:
    """Install Slurm + munge from apt when missing; return why not if that is impossible."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return "Slurm is not installed and apt-get as root is not available to install it"
    policy = subprocess.run(["apt-cache", "policy", "slurmctld"], capture_output=True, text=True)
    if "Candidate: (none)" in policy.stdout or "Candidate:" not in policy.stdout:
        subprocess.run(["apt-get", "update"], capture_output=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", *PACKAGES], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not all(shutil.which(d) for d in DAEMONS):
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """`with SlurmCluster(nodes=2) as c: job = c.sbatch(["script.sh"]); c.wait(job)`."""

    def __init__(self, nodes: int = 1, cpus_per_node: int = 2, kill_wait: int = 5, cred_expire: int = 10):
        self.nodes = [f"bsnode{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.dir = Path(tempfile.mkdtemp(prefix="bertscale-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.jobcomp = self.dir / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict:
        """Environment for client commands (and the jobs they submit) to reach this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        (self.dir / "log").mkdir()
        (self.dir / "state").mkdir()
        socket_path = self.dir / "munge" / "munge.socket"
        socket_path.parent.mkdir(mode=0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                f"--seed-file={self.dir / 'munge' / 'munged.seed'}",
                f"--log-file={self.dir / 'log' / 'munged.log'}",
            ],
        )
        self._wait_for(lambda: socket_path.exists(), timeout, "munged socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._all_nodes_idle, timeout, "all nodes IDLE")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
            try:
                self._wait_for(lambda: not self.squeue(), 3 * self.kill_wait + 30, "jobs to end")
            except TimeoutError:
                pass  # stop the daemons anyway
        # Stop in reverse start order: slurmd(s), slurmctld, munged.
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- client helpers ----------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit a job; `env` entries are added to the job's environment. Returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict ({} once Slurm has forgotten the job)."""
        done = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}

    def squeue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T", check=False).stdout.split("\n")[:-1]

    def completions(self, job_id: int) -> list[dict]:
        """Every end of the job (one per run, requeues included) from the jobcomp/filetxt log."""
        if not self.jobcomp.exists():
            return []
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.read_text().splitlines()]
        return [r for r in records if r.get("JobId") == str(job_id)]

    def wait(self, job_id: int, timeout: float, poll: float = 1.0) -> dict:
        """Wait until the job has ended for good (a requeue is not an end); return `scontrol show job`."""

        def ended() -> dict:
            job = self.job(job_id)
            return job if job.get("JobState") in ENDED else {}

        return self._wait_for(ended, timeout, f"job {job_id} to end", poll)

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("scontrol", *args, check=check)

    def log_tail(self, lines: int = 40) -> str:
        """Daemon logs, for assertion messages."""
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    # --- internals ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.dir / "log" / f"{name}.stdout", "w") as log:
            self.procs[name] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def _all_nodes_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail()}")
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return done.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, probe, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = probe()
            if result:
                return result
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tail()}")

    def _slurm_conf(self, munge_socket: Path) -> str:
        d = self.dir
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        return f"""\
ClusterName=bertscale-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds (default 120) before it may start again: until then
# the nodes still refuse its revoked credential ("already killed, do not launch batch job").
AuthInfo=socket={munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
SchedulerType=sched/builtin
# Start pending jobs within seconds of becoming eligible (a requeued one included), not a minute.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
KillWait={self.kill_wait}
MinJobAge=600
FirstJobId={random.randrange(1000, 60000)}
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
