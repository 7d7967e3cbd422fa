"""A real two-node Slurm cluster on this one host, for tests: ``munged``, ``slurmctld`` and two
``slurmd -N n1`` / ``-N n2`` daemons on 127.0.0.1 with distinct ports, from a config written in a
temporary directory (Debian's slurmctld, slurmd, slurm-client and munge; ``.ci/run`` installs
them). Every daemon it starts is stopped by its PID in ``stop()``, also after a failure; jobs
submitted through ``sbatch()`` that are still there are cancelled first (``scancel``, waited for up
to ``KillWait``), so that a failed test leaves no training processes behind.

Time limits: slurmctld checks them every 30 s (``PERIODIC_TIMEOUT``, compiled in), sending a job's
``--signal=…@N`` on the first check at most N + 30 s before its limit and ending the job on the
first check after it (``OverTimeLimit=0``: no grace). ``--time`` counts whole minutes.

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(["--nodes=2", "launch/slurm.sbatch", ...], env=...)
        info = cluster.wait(job, lambda i: i["JobState"] == "COMPLETED")

``SlurmCluster.unavailable()`` says why a cluster cannot be built here (None when it can); the
tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
HOSTS = "/etc/hosts"


class SlurmUnavailable(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _resolves(name: str) -> bool:
    try:
        return socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, root: str | os.PathLike, cpus_per_node: int = 2, cred_expire_s: int = 5):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.cred_expire_s = cred_expire_s
        self.procs: list[subprocess.Popen] = []
        self.jobs: list[int] = []  # submitted through sbatch(): cancelled in stop()
        self._hosts_line: str | None = None  # the /etc/hosts line this cluster added
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket.2"

    @staticmethod
    def unavailable() -> str | None:
        missing = [d for d in DAEMONS if shutil.which(d) is None
                   and not os.path.exists(f"/usr/sbin/{d}")]
        if missing:
            return f"Slurm/munge not installed (missing {', '.join(missing)}; .ci/run installs them)"
        if os.geteuid() != 0:
            return "the Slurm test cluster needs root (slurmd runs jobs as their user)"
        if not all(_resolves(n) for n in NODES) and not os.access(HOSTS, os.W_OK):
            return f"{', '.join(NODES)} do not resolve to 127.0.0.1 and {HOSTS} is read-only"
        return None

    # ------------------------------------------------------------------ start and stop
    @property
    def env(self) -> dict:
        """The environment for Slurm's client commands (and the jobs they submit)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        reason = self.unavailable()
        if reason:
            raise SlurmUnavailable(reason)
        self._hosts()
        for d in ("munge", "state", "log", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)  # munged refuses a socket directory others can write
        try:
            self._start_munge()
            self._write_conf()
            self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
            for node in NODES:
                self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd.{node}")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _hosts(self) -> None:
        missing = [n for n in NODES if not _resolves(n)]
        if missing:
            self._hosts_line = f"127.0.0.1 {' '.join(missing)}  # pm_dist Slurm test cluster {os.getpid()}"
            with open(HOSTS, "a") as f:
                f.write(f"\n{self._hosts_line}\n")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key), "--force"], check=True,
                       capture_output=True)
        os.chmod(key, 0o400)
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}",
                     f"--socket={self.socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                     f"--seed-file={self.root / 'munge' / 'seed'}",
                     f"--log-file={self.root / 'log' / 'munged.log'}"], "munged")
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise SlurmUnavailable(f"munged did not start: {self._log('munged')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        ctld, *node_ports = _free_ports(1 + len(NODES))
        r = self.root
        lines = [
            "ClusterName=pmdisttest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire={self.cred_expire_s}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r}/slurmd.%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MinJobAge=600",
            "KillWait=20",
            "OverTimeLimit=0",  # the default, stated: a job past its limit ends on the next check
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SchedulerParameters=sched_interval=1,defer_batch=0",
        ]
        for node, port in zip(NODES, node_ports):
            lines.append(f"NodeName={node} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(NODES)} Default=YES "
                     "MaxTime=INFINITE State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, cmd: list[str], name: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))

    def _log(self, name: str) -> str:
        texts = []
        for p in (self.root / "log").glob(f"{name}*"):
            texts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(texts)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        out = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{p.args[0]} exited ({p.returncode}):\n"
                                           f"{self._log('')}")
            res = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env,
                                 capture_output=True, text=True)
            out = res.stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").startswith("idle") for n in NODES):
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"nodes not idle after {timeout_s}s: {out!r}\n{self._log('')}")

    def stop(self) -> None:
        """Cancel the jobs still there, then stop every daemon this cluster started, by its PID
        (munged last)."""
        self._cancel_jobs()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self._hosts_line:  # take back the names it added (rewritten in place: /etc/hosts may be
            try:              # a bind mount that cannot be replaced)
                with open(HOSTS) as f:
                    lines = f.read().splitlines(keepends=True)
                kept = [x for x in lines if x.strip() != self._hosts_line]
                if kept and not kept[-1].strip():
                    kept.pop()
                with open(HOSTS, "w") as f:
                    f.writelines(kept)
            except OSError:
                pass
            self._hosts_line = None

    def _cancel_jobs(self, timeout_s: float = 25.0) -> None:
        """``scancel`` the jobs submitted here that have not ended (a failed test), and wait until
        Slurm has ended their processes (SIGTERM, SIGKILL after ``KillWait``=20 s)."""
        if not self.jobs or not any(p.poll() is None for p in self.procs):
            return
        ids = [str(j) for j in self.jobs]
        live = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                "SUSPENDED", "STOPPED")
        try:
            subprocess.run(["scancel", *ids], env=self.env, capture_output=True, timeout=15)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                res = subprocess.run(["squeue", "-h", "-t", ",".join(live), "-j", ",".join(ids),
                                      "-o", "%i"], env=self.env, capture_output=True, text=True,
                                     timeout=15)
                if res.returncode == 0 and not res.stdout.strip():
                    return
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        res = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                             cwd=cwd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr}")
        job = int(res.stdout.strip().split(";")[0])
        self.jobs.append(job)
        return job

    def job(self, job_id: int) -> dict:
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env,
                             capture_output=True, text=True)
        info = {}
        for field in res.stdout.split():
            if "=" in field:
                k, v = field.split("=", 1)
                info.setdefault(k, v)
        return info

    def scontrol(self, *args: str) -> str:
        res = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {res.stderr}")
        return res.stdout

    def wait(self, job_id: int, done, timeout_s: float = 120.0, poll_s: float = 0.5) -> dict:
        """Poll the job until ``done(info)``; fails with the job's record and the logs."""
        deadline = time.monotonic() + timeout_s
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if done(info):
                return info
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} not done after {timeout_s}s: {info}\n"
                           f"{self._log('slurmctld')}")
