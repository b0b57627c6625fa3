"""05_eval across files: the chapter alone under papermill, and bad input refused before any network runs."""
import json

import h5py
import numpy as np
import papermill as pm
import pytest
from PIL import Image

from conftest import NBS
import minddiffuser.evaluation as ev
from minddiffuser.nsd_data import read_expdesign, read_images


def _layout(root, out, n=12, stage2_folders=True):
    "A subject folder as chapters 02-04 leave it: decoded.h5 with c accuracy, stage1/<id>.png, stage2/<id>/final.png."
    ids = np.sort(read_expdesign(root)["sharedix"] - 1)[:n]
    subj = out/"subj01"; (subj/"stage1").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with h5py.File(subj/"decoded.h5", "w") as f:
        f["nsd_id"] = ids; f["accuracy/c/per_image"] = np.linspace(0, 0.6, n)
    stim = read_images(root, ids)
    for i, im in zip(ids, stim):
        noisy = np.clip(im + rng.normal(0, 40, im.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).resize((512, 512)).save(subj/"stage1"/f"{i}.png")
        if stage2_folders and i in ids[:6]:
            (subj/"stage2"/str(i)).mkdir(parents=True)
            Image.fromarray(im).resize((512, 512)).save(subj/"stage2"/str(i)/"final.png")
    return ids, subj


def test_chapter_alone_under_papermill(synth_root, tmp_path):
    ids, subj = _layout(synth_root, tmp_path/"runs")
    pm.execute_notebook(str(NBS/"05_eval.ipynb"), str(tmp_path/"out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=1, data_root=str(synth_root), out_dir=str(tmp_path/"runs"),
                                        metrics="paper", convention="brain-diffuser", batch_size=6))
    ev_dir = subj/"eval"
    assert sorted(p.name for p in ev_dir.iterdir()) == ["distributions.png", "fig4.png", "per_image.csv", "summary.json"]
    s = json.loads((ev_dir/"summary.json").read_text())
    assert s["metrics"] == ["clip_b32", "ssim", "pixcorr"] and s["convention"] == "brain-diffuser"
    assert s["sets"]["stage2"]["n_missing"] == 6 and s["sets"]["stage2"]["all"]["ssim"]["n"] == 6
    assert s["n_subset"] == int((np.linspace(0, 0.6, 12) >= 0.3).sum())
    d = s["paired"]["stage2 - stage1"]["all"]["ssim"]
    assert d["n"] == 6 and d["lo"] > 0  # clean stimuli beat noisy copies, with the interval above 0
    out = json.dumps(json.loads((tmp_path/"out.ipynb").read_text())["cells"])
    assert "a partial evaluation, 6 of 12 test images" in out


def _no_networks(*a, **k):
    raise AssertionError("a network was loaded before the input was checked")


@pytest.mark.parametrize("break_it, error, match", [
    (lambda subj: __import__("shutil").rmtree(subj/"stage2"), FileNotFoundError, r"--only 04"),
    (lambda subj: Image.new("RGB", (256, 256)).save(next((subj/"stage1").glob("*.png"))), ValueError, "different sizes"),
    (lambda subj: Image.new("RGB", (512, 512)).save(subj/"stage1"/"12345.png"), ValueError, "not test images"),
    (lambda subj: (subj/"decoded.h5").unlink(), FileNotFoundError, r"--only 02"),
])
def test_bad_input_refused_before_networks(synth_root, tmp_path, monkeypatch, break_it, error, match):
    ids, subj = _layout(synth_root, tmp_path/"runs", n=6)
    break_it(subj)
    monkeypatch.setattr(ev, "load_metric_nets", _no_networks)
    with pytest.raises(error, match=match):
        ev.evaluate_subject(1, synth_root, tmp_path/"runs", progress=False)
    assert not (subj/"eval").exists()


def test_missing_weights_offline_named_before_networks(synth_root, tmp_path, monkeypatch):
    ids, subj = _layout(synth_root, tmp_path/"runs", n=6)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("TORCH_HOME", str(tmp_path/"torch"))
    monkeypatch.setattr(ev, "load_metric_nets", _no_networks)
    with pytest.raises(OSError, match="alexnet-owt-7be5be79.pth into"):
        ev.evaluate_subject(1, synth_root, tmp_path/"runs", metrics=["alexnet2"], metric_nets="pretrained",
                            allow_mix=True, progress=False)
