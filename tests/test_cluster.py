"""Stage 2 and the ridge on a cluster (nbs/04b_cluster.ipynb), against a real single-node SLURM started here.

Where SLURM cannot start (no `slurm-wlm`/`munge`, not root), the same tests run on submitit's local executor and
say so in a warning: never a mock.
"""
import contextlib
import io
import json
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minddiffuser.cluster import CLUSTER_CFG, ClusterConfig, Resources, submit_main, submit_ridge, submit_stage2
from minddiffuser.decoders import decode_subject, write_planted_inputs
from minddiffuser.runner import reconstruct
from minddiffuser.stage2 import Stage2Config
from slurm import SlurmUnavailable, single_node_slurm
from test_stage2 import SMALL, make_decoded

IDS = [5, 6, 7, 8]
JOB = Resources(gpus=0, cpus=1, mem_gb=1, hours=0.25)  # one core per job: two shards run side by side on two cores


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    "('slurm', None) with a single-node SLURM running, else ('local', why not)."
    try:
        with single_node_slurm(tmp_path_factory.mktemp("slurm")):
            yield "slurm", None
    except SlurmUnavailable as e:
        warnings.warn(f"SLURM could not start here ({e}): the cluster tests run on submitit's local executor")
        yield "local", str(e)


@pytest.fixture
def stage2_inputs(tmp_path):
    "Chapter 04's inputs (decoded.h5 for the tiny twins, stage 1's settings) in tmp_path/runs."
    from minddiffuser.models import load_models
    m = load_models("tiny", "tiny", device="cpu", seed=0)
    dec = make_decoded(tmp_path/"runs", m, IDS, size=8)
    (dec.parent/"stage1").mkdir()
    (dec.parent/"stage1"/"settings.json").write_text(json.dumps(dict(models="tiny", weights_seed=0, **vars(SMALL))))
    return tmp_path/"runs"


@contextlib.contextmanager
def threads(n:int):
    old = torch.get_num_threads(); torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)


def job_pids(job_id:str) -> list:
    "The processes of a SLURM job (array task `A_T` or job `J`) on this node, found by their SLURM environment."
    arr, _, task = job_id.partition("_")
    want = {f"SLURM_ARRAY_JOB_ID={arr}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()} if task else \
           {f"SLURM_JOB_ID={arr}".encode()}
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try: env = set((p/"environ").read_bytes().split(b"\0"))
        except OSError: continue  # ended meanwhile, or not ours to read
        if want <= env: pids.append(int(p.name))
    return pids


def kill(job, kind:str):
    """Kill a job as a dead node would: on SLURM every process of the job gets SIGKILL at once, with no grace.
    (`scancel`, even with `--signal=KILL`, terminates the step with SIGTERM and KillWait's grace: submitit ignores
    SIGTERM, and a shard with seconds of work left finishes in the grace.) The local executor's cancel here."""
    if kind != "slurm": return job.cancel()
    pids = job_pids(job.job_id)
    assert pids, f"no process of job {job.job_id} found to kill"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError): os.kill(pid, signal.SIGKILL)


def test_stage2_array_with_a_killed_shard_equals_one_process(tmp_path, synth_root, scheduler, stage2_inputs):
    kind, _ = scheduler
    out, ref = stage2_inputs, tmp_path/"ref"
    shutil.copytree(out, ref)
    cfg = Stage2Config(state_every=1)  # a state after every iteration, so the killed shard resumes mid-image
    size = dict(n_iters=10, max_images=len(IDS), batch_size=1)
    with threads(JOB.cpus):  # the jobs run with as many threads as they have CPUs
        single = reconstruct(1, synth_root, ref, cfg=replace(cfg, n_iters=size["n_iters"]), progress=False, **size)

    seen = {}
    def killer(jobs, attempt):  # kills shard 0 once its first image is two iterations in
        if attempt: return
        rec = out/"subj01"/"stage2"/str(IDS[0])/"record.json"
        def watch():
            while not (rec.exists() and json.loads(rec.read_text())["iterations"] >= 2): time.sleep(0.05)
            try: kill(jobs[0], kind); seen["at"] = json.loads(rec.read_text())
            except Exception as e: seen["error"] = repr(e)  # said by the assertion below, not lost in the thread
        threading.Thread(target=watch, daemon=True).start()
    cluster = replace(CLUSTER_CFG, stage2=JOB, poll_s=0.5, probe_iters=2)
    rec = submit_stage2(1, synth_root, out, n_shards=2, executor=kind, cfg=cfg, cluster=cluster, yes=True,
                        on_submit=killer, progress=False, **size)

    assert "error" not in seen and seen["at"]["status"] == "running", seen            # killed midway through an image ...
    assert [a["shards"] for a in rec["attempts"]] == [["0/2", "1/2"], ["0/2"]], rec["attempts"]  # ... and sent again
    assert rec["status"] == "done" and rec["estimate"]["n_images"] == len(IDS) and rec["estimate"]["sec_per_iter"] > 0
    assert json.loads((out/"subj01"/"stage2"/"submit.json").read_text())["status"] == "done"
    got = sorted(p.name for p in (out/"subj01"/"stage2").iterdir() if p.is_dir())
    assert got == sorted(map(str, IDS)) == sorted(f.name for f in single)  # no gap, no overlap, nothing else
    for f in single:
        g = out/"subj01"/"stage2"/f.name
        a, b = (json.loads((p/"record.json").read_text()) for p in (f, g))
        np.testing.assert_allclose(a["history"]["loss"], b["history"]["loss"], rtol=1e-6)
        assert (a["status"], a["iterations"]) == (b["status"], b["iterations"]) == ("done", size["n_iters"])
        sa, sb = load_file(f/"state.safetensors"), load_file(g/"state.safetensors")
        for k in ("c", "z"): torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7)
        assert (f/"final.png").read_bytes() == (g/"final.png").read_bytes()


def test_ridge_on_one_node_equals_a_local_fit(tmp_path, scheduler):
    kind, _ = scheduler
    for name in ("local", "job"): write_planted_inputs(tmp_path/name/"subj01", n_train=200, n_test=20, n_voxels=120)
    with threads(JOB.cpus):
        local = decode_subject(tmp_path/"local", 1, device="cpu", n_workers=JOB.cpus, progress=False)
    job = submit_ridge(1, tmp_path/"job", executor=kind, device="cpu",
                       cluster=replace(CLUSTER_CFG, ridge=JOB, poll_s=0.5))
    with h5py.File(local) as a, h5py.File(job) as b:
        keys = []
        a.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset) else None)
        assert keys and sorted(keys) == sorted(k for k in keys if k in b)
        for k in keys: np.testing.assert_allclose(a[k][()], b[k][()], rtol=1e-5, atol=1e-7, err_msg=k)


def test_submit_refuses_in_one_line_before_sending(tmp_path, synth_root, stage2_inputs, scheduler):
    kind, _ = scheduler
    out = ["--out-dir", str(stage2_inputs)]
    for argv, msg in ((["stage2", "--subject", "3", *out], "subj03"),
                      (["stage2", "--subject", "1", *out, "--no-probe"], "--no-probe needs --shards"),
                      (["stage2", "--subject", "1", *out, "--cpus", "0", "--executor", kind], "cpus >= 1"),
                      (["ridge", "--subject", "2", *out, "--executor", kind], "fmri.h5 is missing: run `minddiffuser run --subject 2 --only 00`")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err): assert submit_main(argv) == 2, argv
        assert err.getvalue().count("\n") == 1 and msg in err.getvalue(), (argv, err.getvalue())
    assert not (stage2_inputs/"subj01"/"slurm").exists()  # nothing was sent


def test_submit_without_yes_estimates_and_launches_nothing(tmp_path, synth_root, stage2_inputs, scheduler, capsys):
    kind, _ = scheduler
    argv = ["stage2", "--subject", "1", "--data-root", str(synth_root), "--out-dir", str(stage2_inputs),
            "--executor", kind, "--gpus", "0", "--cpus", "1", "--mem", "1", "--hours", "0.25", "--n-iters", "300",
            "--probe-iters", "2"]
    assert submit_main(argv) == 0
    out = capsys.readouterr().out
    assert "4 images x 300 iterations" in out and "CPU-hours" in out and "add --yes to launch" in out, out
    assert not (stage2_inputs/"subj01"/"stage2").exists()  # the probe's scratch folder is gone, no image was made
