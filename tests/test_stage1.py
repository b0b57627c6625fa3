"""Stage 1 across notebooks: the papermill run on a decoded.h5, resumption after an interruption, bad inputs."""
import json
from dataclasses import replace

import numpy as np
import papermill as pm
import pytest
import torch
from PIL import Image

import minddiffuser.stage1 as s1
from conftest import NBS
from minddiffuser.decoders import write_fake_decoded
from minddiffuser.models import load_models
from minddiffuser.nsd_data import read_expdesign, subject_dir

SMALL = s1.STAGE1_SMALL  # the authors' proportions, 10 steps


@pytest.fixture(scope="module")
def tiny():
    return load_models("tiny", "tiny", device="cpu")


def _decoded(synth_root, out_dir, m, n=3, latent_size=8):
    ids = np.sort(read_expdesign(synth_root)["sharedix"] - 1)[:n]
    write_fake_decoded(subject_dir(out_dir, 1)/"decoded.h5", m, ids, latent_size=latent_size)
    return ids


def _pngs(d):
    return {p.stem: np.asarray(Image.open(p)).astype(int) for p in sorted(d.glob("*.png"))}


def test_papermill_writes_stage1_images(synth_root, tmp_path, tiny):
    ids = _decoded(synth_root, tmp_path/"runs", tiny, n=4)
    pm.execute_notebook(str(NBS/"03_stage1.ipynb"), str(tmp_path/"out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=1, data_root=str(synth_root), out_dir=str(tmp_path/"runs"),
                                        max_images=3, batch_size=2, t_enc=7, t_start=7))
    d = tmp_path/"runs/subj01/stage1"
    assert sorted(p.stem for p in d.glob("*.png")) == sorted(str(i) for i in ids[:3])
    rec = json.loads((d/"settings.json").read_text())
    assert (rec["t_enc"], rec["t_start"], rec["guidance"], rec["seed"], rec["models"]) == (7, 7, 5.0, 42, "tiny")
    assert not list(d.glob("*.tmp"))


def test_missing_decoded_names_the_command(synth_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"minddiffuser run --subject 1 --only 02"):
        s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=SMALL, progress=False)


def test_interrupted_run_resumes_to_the_same_images(synth_root, tmp_path, tiny, monkeypatch):
    _decoded(synth_root, tmp_path/"a", tiny, n=5)
    _decoded(synth_root, tmp_path/"b", tiny, n=5)
    whole = s1.run_stage1(1, synth_root, tmp_path/"a", batch_size=2, cfg=SMALL, progress=False)
    save, calls = s1._save_png, []
    def crash(im, path):
        calls.append(path)
        if len(calls) == 3: raise KeyboardInterrupt("planted interruption")
        save(im, path)
    monkeypatch.setattr(s1, "_save_png", crash)
    with pytest.raises(KeyboardInterrupt):
        s1.run_stage1(1, synth_root, tmp_path/"b", batch_size=2, cfg=SMALL, progress=False)
    part = tmp_path/"b/subj01/stage1"
    assert len(list(part.glob("*.png"))) == 2
    monkeypatch.setattr(s1, "_save_png", save)
    s1.run_stage1(1, synth_root, tmp_path/"b", batch_size=3, cfg=SMALL, progress=False)
    a, b = _pngs(whole), _pngs(part)
    assert a.keys() == b.keys() and len(a) == 5
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1  # the same noise per image, whatever the batches


def test_other_settings_are_refused_unless_overwrite(synth_root, tmp_path, tiny):
    _decoded(synth_root, tmp_path/"runs", tiny, n=2)
    d = s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=SMALL, progress=False)
    with pytest.raises(ValueError, match=r"t_enc=7 \(now 6\)"):
        s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=replace(SMALL, t_enc=6), progress=False)
    s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=replace(SMALL, t_enc=6), overwrite=True, progress=False)
    assert json.loads((d/"settings.json").read_text())["t_enc"] == 6 and len(list(d.glob("*.png"))) == 2


def test_decoded_of_other_models_is_refused(synth_root, tmp_path, tiny):
    ids = _decoded(synth_root, tmp_path/"runs", tiny, n=2)
    path = subject_dir(tmp_path/"runs", 1)/"decoded.h5"
    import h5py
    with h5py.File(path, "a") as f:
        del f["c"]; f["c"] = np.zeros((len(ids), 15, 768), np.float32)  # SD v1-4 width, but tiny models
    with pytest.raises(ValueError, match="width 768"):
        s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=SMALL, progress=False)
    with h5py.File(path, "a") as f: f.attrs["models"] = "CompVis/stable-diffusion-v1-4"
    with pytest.raises(ValueError, match="on the synthetic demo NSD"):  # run alone it takes its inputs' networks: refused here
        s1.run_stage1(1, synth_root, tmp_path/"runs", cfg=SMALL, progress=False)
    with pytest.raises(ValueError, match="holds features made with models='CompVis/stable-diffusion-v1-4'"):
        s1.run_stage1(1, synth_root, tmp_path/"runs", "tiny", "tiny", cfg=SMALL, progress=False)


def test_gradients_flow_in_batch_with_checkpointing(tiny):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 15, tiny.text_width, generator=g, requires_grad=True)
    z = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    uc = s1.uncond_embedding(tiny.tokenizer, tiny.text_encoder)
    out = s1.ddim_img2img(tiny.unet, tiny.scheduler, c, z, uc, SMALL, generator=torch.Generator().manual_seed(1),
                          gradient_checkpointing=True)
    s1.decode_latents(tiny.vae, out.latents, gradient_checkpointing=True).mean().backward()
    for t in (c.grad, z.grad): assert t.isfinite().all() and (t.abs().sum(dim=tuple(range(1, t.ndim))) > 0).all()
