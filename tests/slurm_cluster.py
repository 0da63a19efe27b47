"""A real single-node SLURM cluster on localhost, for tests.

munged, slurmctld and slurmd from Debian's packages (slurm-wlm, munge) are
started by hand with their own key, socket, config, state and logs in a
temporary folder, so nothing in /etc is touched and only these processes are
stopped afterwards. There is no accounting database: MinJobAge is long, so
`squeue` still lists finished jobs, and finished jobs are also written to a
job-completion log (jobcomp/filetxt) that the tests read.

The node claims more CPUs and memory than the machine has and two GPUs
(gres without device files; SlurmdParameters=config_overrides) so that the
workflow's real SLURM profile, which asks for GPUs, is scheduled unchanged.
The GPU is the one thing mocked: jobs that get one still run on the CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from medseg.tracking_server import free_port, stop_process_group

PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo")

NODE_CPUS = 16
NODE_MEMORY_MB = 64000
NODE_GPUS = 2


@dataclass
class LocalSlurmCluster:
    """Folder-contained single-node cluster; ``env`` points clients at it."""

    root: Path
    programs: dict[str, str]
    partition: str = "medseg"
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients (sbatch, squeue, snakemake)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    def _write_srun_wrapper(self) -> None:
        """Inside a job, Snakemake's jobstep plugin starts `srun` with every
        SLURM_* variable removed, SLURM_CONF included, so srun would look for
        /etc/slurm/slurm.conf. A real cluster has its config there (or
        configless); this one lives in a temporary folder, so `srun` on PATH
        re-adds SLURM_CONF and runs the real srun."""
        self.bin_dir.mkdir(exist_ok=True)
        wrapper = self.bin_dir / "srun"
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {self.programs["srun"]} "$@"\n')
        wrapper.chmod(0o755)

    @property
    def jobcomp_log(self) -> Path:
        return self.root / "jobcomp.log"

    def _write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=medsegtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r / 'munge.socket'}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_log}
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=3600
ReturnToService=2
MpiDefault=none
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm drops GPUs without device files; plain files stand in for them.
        for i in range(NODE_GPUS):
            (r / f"fake-gpu{i}").touch()
        (r / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={host} Name=gpu File={r / 'fake-gpu'}[0-{NODE_GPUS - 1}]\n")

    def start(self, timeout_s: float = 60) -> None:
        r = self.root
        self._write_config()
        self._write_srun_wrapper()
        key = r / "munge.key"
        subprocess.run([self.programs["mungekey"], "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o400)
        self._spawn([self.programs["munged"], "--foreground", "--force", f"--socket={r / 'munge.socket'}",
                     f"--key-file={key}", f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                     f"--seed-file={r / 'munged.seed'}"], "munged")
        self._wait(lambda: (r / "munge.socket").exists(), timeout_s, "munged socket")
        self._spawn([self.programs["slurmctld"], "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([self.programs["slurmd"], "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self._node_idle, timeout_s, "node idle")

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))

    def _node_idle(self) -> bool:
        proc = subprocess.run([self.programs["sinfo"], "-h", "-o", "%t"], capture_output=True, text=True,
                              env=self.env)
        return proc.returncode == 0 and proc.stdout.strip() == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} (exited: {dead}); logs:\n{self.logs()}")
            time.sleep(0.3)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def completed_jobs(self) -> list[dict[str, str]]:
        """Finished jobs from the job-completion log (key=value per line)."""
        if not self.jobcomp_log.exists():
            return []
        jobs = []
        for line in self.jobcomp_log.read_text().splitlines():
            fields = {}
            for token in line.split():
                key, _, value = token.partition("=")
                fields[key] = value
            jobs.append(fields)
        return jobs

    def stop(self) -> None:
        """Stop only the processes this cluster started (slurmd first, munged last)."""
        for proc in reversed(self.processes):
            stop_process_group(proc, timeout_s=20)
        self.processes.clear()
