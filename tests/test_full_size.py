"""The real path at the real sizes: chapters 01 -> 04 with full-size SD v1-4 / ViT-B/32 twins loaded from disk.

Slow (tens of minutes on two CPU cores, ~2.4 GB of twins written once to runs/full_size_twins): run it with

    MINDDIFFUSER_SLOW=1 python -m pytest -s tests/test_full_size.py

It writes the synthetic NSD, keeps 8 training images and 1 test image, and runs features (c 15x768, z 4x64x64,
CLIP 6 x 38400 and a 512-d embedding from 512-px stimuli), decoders, stage 1 and one stage-2 iteration
back-propagating through all 35 denoising steps; it checks every shape and records the peak memory and the seconds
per stage-2 iteration in runs/full_size_chain.json. It sets glibc's mmap threshold to 64 KiB first (as
`MALLOC_MMAP_THRESHOLD_=65536` does; see bench/stage2.py): with the default, freed activation buffers stay resident
and stage 2 outgrew 24 GB in its first iteration.
"""
import ctypes
import json
import os
import re
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from minddiffuser.features import FEATURE_CFG, extract_features
from minddiffuser.models import write_full_size_twins
from minddiffuser.nsd_data import build_fmri, resolve_out_dir, write_synthetic_nsd
from minddiffuser.decoders import decode_subject
from minddiffuser.stage1 import run_stage1
from minddiffuser.runner import reconstruct

pytestmark = pytest.mark.skipif(not os.environ.get("MINDDIFFUSER_SLOW"),
                                reason="slow (full-size networks on the CPU): set MINDDIFFUSER_SLOW=1 to run")
N_TRAIN, N_TEST = 8, 1


def _peak_gib() -> float:
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 2**20


def _keep_rows(fmri:Path, n_train:int, n_test:int):
    "Cut fmri.h5 down to its first rows, keeping every attribute (the run's input for a one-image chain)."
    with h5py.File(fmri, "r") as f:
        data = {k: f[k][: (n_train if k.startswith("train") else n_test)] for k in
                ("train/fmri", "train/nsd_id", "train/n_trials", "test/fmri", "test/nsd_id", "test/n_trials")}
        data |= {k: f[k][:] for k in ("voxels/ijk", "voxels/roi")}
        attrs = dict(f.attrs)
    with h5py.File(fmri, "w") as f:
        for k, v in data.items(): f[k] = v
        f.attrs.update(attrs)


def test_chain_at_full_size(tmp_path):
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: freed buffers go back to the OS at once
    t0, times = time.time(), {}
    sd, ck = write_full_size_twins()
    root, out = write_synthetic_nsd(tmp_path/"nsd", subjects=(1,)), tmp_path/"runs"
    _keep_rows(build_fmri(root, 1, out, n_sessions=3), N_TRAIN, N_TEST)
    times["00"] = time.time() - t0
    kw = dict(models=str(sd), clip_model=str(ck), device="cpu", allow_mix=True)  # real-size networks on the synthetic tree

    t = time.time()
    feats = extract_features(1, root, out, batch_size=2, **kw)
    times["01"] = time.time() - t
    with h5py.File(feats) as f:
        assert f["test/c"].shape == (N_TEST, 15, 768) and f["train/z"].shape == (N_TRAIN, 4, 64, 64)
        for k in FEATURE_CFG.clip_layers: assert f[f"test/clip/{k}"].shape == (N_TEST, 50 * 768)
        assert f["test/clip/embed"].shape == (N_TEST, 512)

    t = time.time()
    dec = decode_subject(out, 1, device="cpu", progress=False)
    times["02"] = time.time() - t
    with h5py.File(dec) as f:
        assert f["c"].shape == (N_TEST, 15, 768) and f["z"].shape == (N_TEST, 4, 64, 64)
        assert f[f"clip/{FEATURE_CFG.clip_layers[0]}"].shape == (N_TEST, 38400) and f["clip/embed"].shape == (N_TEST, 512)
        nsd_id = int(f["nsd_id"][0])

    t = time.time()
    s1 = run_stage1(1, root, out, batch_size=1, progress=False, **kw)
    times["03"] = time.time() - t
    assert Image.open(s1/f"{nsd_id}.png").size == (512, 512)

    t = time.time()
    folders = reconstruct(1, root, out, n_iters=1, max_images=1, progress=False, **kw)
    times["04"] = time.time() - t
    rec = json.loads((folders[0]/"record.json").read_text())
    assert rec["status"] == "done" and rec["iterations"] == 1
    assert Image.open(folders[0]/"final.png").size == (512, 512)

    figures = dict(seconds_per_chapter={k: round(v) for k, v in times.items()}, stage2_seconds=rec["seconds"],
                   peak_rss_gib=round(_peak_gib(), 2), cpu_threads=os.cpu_count(), load_avg=os.getloadavg())
    (resolve_out_dir("runs")/"full_size_chain.json").write_text(json.dumps(figures, indent=1))
    print("\nfull-size chain on the CPU:", json.dumps(figures))
