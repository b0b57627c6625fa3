"Ablations (nbs/06_ablations.ipynb): the chapter alone under papermill on a prepared runs folder, and `configs`."
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from minddiffuser.ablations import ABL_CFG, run_ablations
from minddiffuser.decoders import write_fake_decoded
from minddiffuser.models import load_models
from minddiffuser.nsd_data import read_expdesign, read_images, subject_dir
from minddiffuser.runner import plant_targets

NBS = Path(__file__).resolve().parents[1] / "nbs"


@pytest.fixture(scope="module")
def m():
    return load_models("tiny", "tiny", device="cpu", seed=0)


def tree_decoded(out_dir, m, root, n=2, size=8):
    "A decoded.h5 for the first test images of the synthetic tree: their own CLIP features as targets, a c accuracy."
    ids = np.sort(read_expdesign(root)["sharedix"] - 1)[:n]
    path = plant_targets(write_fake_decoded(subject_dir(out_dir, 1) / "decoded.h5", m, ids, latent_size=size), m,
                         read_images(root, ids, size=8 * size))
    with h5py.File(path, "a") as f: f["accuracy/c/per_image"] = np.linspace(0.5, 0.1, n)
    return path, ids


def test_configs_parameter_runs_full_and_the_chosen(tmp_path, m, synth_root):
    dec, ids = tree_decoded(tmp_path, m, synth_root)
    done = run_ablations(1, synth_root, tmp_path, configs="takagi", progress=False)
    assert list(done) == ["full", "takagi"]
    assert sorted(p.name for p in (dec.parent / "ablations").iterdir()) == ["full", "takagi"]
    rec = json.loads((done["takagi"][0] / "record.json").read_text())
    assert (rec["settings"]["seed"], rec["iterations"], rec["history"]["lr"]) == (816, 1, [0.0])
    assert [f.name for f in done["full"]] == [str(ids[0])]  # the demo's size: one image


def test_papermill_runs_the_chapter_alone(tmp_path, m, synth_root):
    pm = pytest.importorskip("papermill")
    dec, ids = tree_decoded(tmp_path, m, synth_root)
    pm.execute_notebook(str(NBS / "06_ablations.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=1, data_root=str(synth_root), out_dir=str(tmp_path), n_iters=4,
                                        max_images=2, batch_size=2))
    abl = dec.parent / "ablations"
    for k, a in ABL_CFG.configs.items():
        rec = json.loads((abl / k / str(ids[0]) / "record.json").read_text())
        assert rec["status"] == "done", k
        assert rec["iterations"] == (ABL_CFG.demo["n_iters"] if a.stage2 and a.iters == 1 else 1), k
    ev = abl / "eval"
    for f in ("grid.png", "trajectories.png", "tradeoffs.png", "per_image.csv", "table2_all.csv", "summary.json"):
        assert (ev / f).stat().st_size > 0, f
    t2 = pd.read_csv(ev / "table2_all.csv", index_col=0)
    assert list(t2.index) == list(ABL_CFG.configs)
    assert t2.loc["full", "paper_clip_b32"] == 0.765 and np.isfinite(t2.loc["without_z", "ssim"])
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["claims"]["all"][0].startswith("Synthetic NSD")
