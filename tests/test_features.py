"""01_features across notebooks: the papermill step on a synthetic NSD tree, resumption through `extract_features`,
and the errors for missing or mismatched inputs."""
import h5py
import numpy as np
import pandas as pd
import papermill as pm
import pytest

import minddiffuser.features as features
from conftest import NBS
from minddiffuser.features import FEATURE_CFG, FeatureConfig, extract_features, image_features
from minddiffuser.models import load_models
from minddiffuser.nsd_data import read_captions, read_images

FEATURES_64 = FeatureConfig(vae_size=64)   # 4x8x8 latents keep these tests fast; the notebook's run uses 512


def fake_fmri(root, out, subject=1, n_train=10, n_test=4, data_root=None):
    "An fmri.h5 holding what 01_features reads (nsd_id rows, data_root) for a few of the subject's images."
    info = pd.read_csv(root/"nsddata/experiments/nsd/nsd_stim_info_merged.csv")
    seen = info[info[f"subject{subject}"] == 1]
    shared = seen.shared1000.astype(bool)
    ids = {"train": np.sort(seen[~shared].nsdId.values)[:n_train], "test": np.sort(seen[shared].nsdId.values)[:n_test]}
    d = out/f"subj{subject:02d}"
    d.mkdir(parents=True, exist_ok=True)
    with h5py.File(d/"fmri.h5", "w") as f:
        for s, v in ids.items(): f[f"{s}/nsd_id"] = v.astype(np.int64)
        f.attrs.update(data_root=str((data_root or root).resolve()), subject=subject, synthetic=True)
    return ids


def h5_items(path):
    "Every dataset's values and every object's attributes."
    with h5py.File(path) as f:
        out = {"/ attrs": dict(f.attrs)}
        def visit(k, v):
            out[k + " attrs"] = dict(v.attrs)
            if isinstance(v, h5py.Dataset): out[k] = v[:]
        f.visititems(visit)
    return out


def test_papermill_features_aligned_with_fmri(synth_root, tmp_path):
    out = tmp_path/"runs"
    ids = fake_fmri(synth_root, out)
    pm.execute_notebook(str(NBS/"01_features.ipynb"), str(tmp_path/"out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=1, data_root=str(synth_root), out_dir=str(out), batch_size=4,
                                                   models="tiny", clip_model="tiny"))  # the twins: 512-px VAE input
    path = out/"subj01/features.h5"
    m = load_models("tiny", "tiny", device="cpu")
    with h5py.File(path) as f:
        assert f.attrs["complete"] and f.attrs["models"] == "tiny" and f.attrs["synthetic"]
        for s, v in ids.items():
            np.testing.assert_array_equal(f[f"{s}/nsd_id"][:], v)
            assert f[s].attrs["done"] == len(v)
            assert f[f"{s}/z"].shape == (len(v), 4, 64, 64)
            assert f[f"{s}/c"].shape == (len(v), 15, m.text_width)
            for name in FEATURE_CFG.clip_layers:
                assert f[f"{s}/clip/{name}"].shape == (len(v), m.clip_tokens*m.clip_width)
        row = 5                                               # an independent recomputation of one row
        i = ids["train"][row: row + 1]
        want = image_features(m, read_images(synth_root, i), read_captions(synth_root, i), i)
        for k, v in want.items(): np.testing.assert_allclose(f["train"][k][row], v[0], atol=1e-4)
    assert not path.with_name("features.h5.partial").exists()


def test_resume_after_interruption_equals_uninterrupted(synth_root, tmp_path, monkeypatch):
    a, b = tmp_path/"a", tmp_path/"b"
    fake_fmri(synth_root, a); fake_fmri(synth_root, b)
    kw = dict(subject=1, data_root=synth_root, batch_size=3, cfg=FEATURES_64)
    ref = extract_features(out_dir=a, **kw)
    calls = []
    def flaky(root, ids):
        calls.append(list(ids))
        if len(calls) == 3: raise RuntimeError("simulated crash")
        return read_images(root, ids)
    monkeypatch.setattr(features, "read_images", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"): extract_features(out_dir=b, **kw)
    part = b/"subj01/features.h5.partial"
    with h5py.File(part) as f: assert f["train"].attrs["done"] == 6 and f["test"].attrs["done"] == 0
    done = {i for c in calls[:2] for i in c}
    def strict(root, ids):
        assert not done & set(map(int, ids)), "rows already written were recomputed"
        return read_images(root, ids)
    monkeypatch.setattr(features, "read_images", strict)
    got = extract_features(out_dir=b, **kw)
    assert not part.exists()
    want, have = h5_items(ref), h5_items(got)
    want["/ attrs"].pop("data_root"); have["/ attrs"].pop("data_root")      # same root, but check the rest exactly
    assert sorted(want) == sorted(have)
    np.testing.assert_equal(have, want)
    monkeypatch.setattr(features, "read_images", lambda root, ids: 1/0)     # finished: a rerun reads nothing
    assert extract_features(out_dir=b, **kw) == got


def test_missing_and_mismatched_inputs(synth_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="00_nsd_data"):
        extract_features(1, data_root=synth_root, out_dir=tmp_path/"empty", cfg=FEATURES_64)
    fake_fmri(synth_root, tmp_path/"other", data_root=tmp_path)
    with pytest.raises(ValueError, match="was built from"):
        extract_features(1, data_root=synth_root, out_dir=tmp_path/"other", cfg=FEATURES_64)
    fake_fmri(synth_root, tmp_path/"ok")
    extract_features(1, data_root=synth_root, out_dir=tmp_path/"ok", cfg=FEATURES_64)
    with pytest.raises(ValueError, match="run_seed=0 \\(now 3\\)"):
        extract_features(1, data_root=synth_root, out_dir=tmp_path/"ok", cfg=FEATURES_64, seed=3)
    part = tmp_path/"ok/subj01/features.h5.partial"
    part.write_bytes(b"not an hdf5 file")
    (tmp_path/"ok/subj01/features.h5").unlink()
    with pytest.raises(ValueError, match="cannot be read"):
        extract_features(1, data_root=synth_root, out_dir=tmp_path/"ok", cfg=FEATURES_64)
    assert extract_features(1, data_root=synth_root, out_dir=tmp_path/"ok", cfg=FEATURES_64, overwrite=True).exists()
    with pytest.raises(ValueError, match="batch_size=0"):
        extract_features(1, data_root=synth_root, out_dir=tmp_path/"ok", cfg=FEATURES_64, batch_size=0, overwrite=True)
