"""A real single-node SLURM on this machine for the cluster tests (Debian's `slurm-wlm` and `munge`).

`single_node_slurm(folder)` starts munged with its own key and socket, then slurmctld and slurmd on free ports
with a configuration written into `folder`, exports SLURM_CONF, waits for the node to be idle, and stops all three
when the block ends. It raises `SlurmUnavailable` with the reason when it cannot (not root, a binary missing, a
daemon that does not come up), so the caller can fall back to submitit's local executor and say so.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


class SlurmUnavailable(RuntimeError): pass


def _which(name:str) -> str:
    for p in [shutil.which(name)] + [f"{d}/{name}" for d in SBIN]:
        if p and os.access(p, os.X_OK): return p
    raise SlurmUnavailable(f"`{name}` is not installed (apt-get install slurm-wlm munge)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _conf(folder:Path, host:str, sock:Path, cpus:int, mem_mb:int) -> str:
    return "\n".join([
        "ClusterName=minddiffuser-test", f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "SchedulerType=sched/backfill", "ReturnToService=2", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none", "KillWait=2",
        f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def _stop(pidfile:Path):
    try: os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError): pass


@contextmanager
def single_node_slurm(folder, cpus:int|None=None, mem_mb:int=4000, timeout:float=30):
    "Start munged, slurmctld and slurmd for this machine as one node; yield the environment SLURM commands need."
    if os.geteuid() != 0: raise SlurmUnavailable("the daemons need root (this user is not)")
    munged, ctld, slurmd = _which("munged"), _which("slurmctld"), _which("slurmd")
    for tool in ("sbatch", "squeue", "scancel", "sinfo"): _which(tool)
    folder = Path(folder); (folder/"state").mkdir(parents=True, exist_ok=True); (folder/"spool").mkdir(exist_ok=True)
    key, sock = folder/"munge.key", folder/"munge.sock"
    key.write_bytes(os.urandom(128)); key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = folder/"slurm.conf"
    conf.write_text(_conf(folder, host, sock, cpus or os.cpu_count(), mem_mb))
    old = os.environ.get("SLURM_CONF")
    started = []
    try:
        r = subprocess.run([munged, "--force", f"--socket={sock}", f"--key-file={key}",
                            f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                            f"--seed-file={folder}/munged.seed"], capture_output=True, text=True)
        if r.returncode: raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")
        started.append(folder/"munged.pid")
        for exe, pid in ((ctld, "slurmctld.pid"), (slurmd, "slurmd.pid")):
            r = subprocess.run([exe, "-f", str(conf)], capture_output=True, text=True)
            if r.returncode: raise SlurmUnavailable(f"{Path(exe).name} did not start: {r.stderr.strip()}")
            started.append(folder/pid)
        os.environ["SLURM_CONF"] = str(conf)
        t0 = time.time()
        sinfo = lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
        while (state := sinfo()) != "idle":
            if time.time() - t0 > timeout: raise SlurmUnavailable(
                f"the node is {state or 'not listed'} after {timeout:.0f} s; see {folder}/slurmctld.log and slurmd.log")
            time.sleep(0.5)
        yield dict(SLURM_CONF=str(conf), folder=str(folder))
    finally:
        subprocess.run(["scancel", "--quiet", "--partition=test"], capture_output=True)
        for p in reversed(started): _stop(p)
        if old is None: os.environ.pop("SLURM_CONF", None)
        else: os.environ["SLURM_CONF"] = old
