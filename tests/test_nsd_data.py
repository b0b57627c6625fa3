"""00_nsd_data against an independent computation of the issue's semantics, and its errors on bad input."""
import shutil

import h5py
import nibabel as nib
import numpy as np
import papermill as pm
import pytest
import scipy.io
import yaml

from conftest import NBS
from minddiffuser.nsd_data import build_fmri, check_subject, read_captions, read_images

MANIFEST = yaml.safe_load((NBS.parent/"data_manifest.yaml").read_text())


def _ctab(p):
    return {l.split()[1].lower(): int(l.split()[0]) for l in p.read_text().splitlines() if l.strip()}


def independent_fmri(root, subject, n_sessions):
    "The issue's semantics, computed directly from the raw files with plain numpy."
    d = scipy.io.loadmat(root/"nsddata/experiments/nsd/nsd_expdesign.mat")
    mo, si = d["masterordering"].ravel().astype(int), d["subjectim"].astype(int)
    roi_dir = root/f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
    lab = root/"nsddata/freesurfer/fsaverage/label"
    kast = np.asarray(nib.load(roi_dir/"Kastner2015.nii.gz").dataobj)
    prf = np.asarray(nib.load(roi_dir/"prf-visualrois.nii.gz").dataobj)
    kn = {v: k for k, v in _ctab(lab/"Kastner2015.mgz.ctab").items()}
    pn = {v: k for k, v in _ctab(lab/"prf-visualrois.mgz.ctab").items()}
    name = np.vectorize(lambda k, p: pn[p] if p > 0 else (kn[k] if k > 0 else ""))(kast, prf)
    ijk = []
    for labels in MANIFEST["rois"]["paper"]["groups"].values():
        m = np.isin(name, [l.lower() for l in labels])
        ijk += sorted(map(tuple, np.argwhere(m)), key=lambda v: (v[2], v[1], v[0]))
    ijk = np.array(ijk)
    ids = si[subject - 1, mo[: 750*n_sessions] - 1] - 1
    z = []
    for s in range(1, n_sessions + 1):
        with h5py.File(root/f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{s:02d}.hdf5") as f:
            b = f["betas"][:].astype(np.float64).transpose(0, 3, 2, 1)/300     # (750, X, Y, Z)
        x = b[:, ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        sd = x.std(0)
        z.append(np.where(sd > 0, (x - x.mean(0))/np.where(sd > 0, sd, 1), 0))
    z = np.concatenate(z)
    out = {}
    for split, sel in (("train", mo[: 750*n_sessions] > 1000), ("test", mo[: 750*n_sessions] <= 1000)):
        u = np.unique(ids[sel])
        out[split] = u, np.stack([z[ids == i].mean(0) for i in u]), np.array([(ids == i).sum() for i in u])
    return ijk, out


def test_papermill_fmri_equals_independent(synth_root, tmp_path):
    out = tmp_path/"runs"
    pm.execute_notebook(str(NBS/"00_nsd_data.ipynb"), str(tmp_path/"out.ipynb"), cwd=str(NBS), progress_bar=False,
                        parameters=dict(subject=2, data_root=str(synth_root), out_dir=str(out)))
    ijk, want = independent_fmri(synth_root, 2, 3)
    with h5py.File(out/"subj02/fmri.h5") as f:
        np.testing.assert_array_equal(f["voxels/ijk"][:], ijk)
        for split in ("train", "test"):
            ids, x, n = want[split]
            np.testing.assert_array_equal(f[f"{split}/nsd_id"][:], ids)
            np.testing.assert_array_equal(f[f"{split}/n_trials"][:], n)
            np.testing.assert_allclose(f[f"{split}/fmri"][:], x, atol=2e-5)
        assert f.attrs["subject"] == 2 and f.attrs["n_sessions"] == 3


def test_nsdgeneral_selection(synth_root, tmp_path):
    p = build_fmri(synth_root, subject=1, out_dir=tmp_path, n_sessions=2, rois="nsdgeneral")
    gen = np.asarray(nib.load(synth_root/"nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").dataobj)
    with h5py.File(p) as f:
        assert len(f["voxels/ijk"]) == (gen > 0).sum()
        assert (gen[tuple(f["voxels/ijk"][:].T)] == 1).all()


def test_resume_after_interruption(synth_root, tmp_path, monkeypatch):
    import minddiffuser.nsd_data as nd
    calls, real = [], nd.read_session

    def flaky(root, subject, session, *a, **k):
        calls.append(session)
        if session == 2 and calls.count(2) == 1: raise KeyboardInterrupt
        return real(root, subject, session, *a, **k)
    monkeypatch.setattr(nd, "read_session", flaky)
    with pytest.raises(KeyboardInterrupt): nd.build_fmri(synth_root, subject=1, out_dir=tmp_path, n_sessions=3)
    assert not (tmp_path/"subj01/fmri.h5").exists()
    p = nd.build_fmri(synth_root, subject=1, out_dir=tmp_path, n_sessions=3)
    assert calls == [1, 2, 2, 3]                       # session 1 came from the cache
    ref = nd.build_fmri(synth_root, subject=1, out_dir=tmp_path/"ref", n_sessions=3)
    with h5py.File(p) as a, h5py.File(ref) as b: np.testing.assert_array_equal(a["train/fmri"][:], b["train/fmri"][:])


def test_stimuli_and_captions(synth_root):
    with h5py.File(synth_root/"synthetic_truth.h5") as t: some = t["subj01/nsd_id"][:4]
    ims = read_images(synth_root, some[::-1])
    with h5py.File(synth_root/"nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5") as f:
        np.testing.assert_array_equal(ims[0], f["imgBrick"][some[-1]])
    caps = read_captions(synth_root, some)
    assert all(len(c) == 5 for c in caps)


@pytest.fixture
def tree_copy(synth_root, tmp_path):
    dst = tmp_path/"nsd"
    shutil.copytree(synth_root, dst)
    return dst


def _betas(root, s, sess): return root/f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session{sess:02d}.hdf5"


def test_bad_inputs(tree_copy, tmp_path):
    with pytest.raises(ValueError, match="unknown subject"): build_fmri(tree_copy, subject=9, out_dir=tmp_path)
    with pytest.raises(ValueError, match="not in the synthetic tree"): build_fmri(tree_copy, subject=7, out_dir=tmp_path)
    _betas(tree_copy, 1, 3).unlink()
    with pytest.raises(FileNotFoundError, match="session 3.*minddiffuser download"): build_fmri(tree_copy, subject=1, out_dir=tmp_path)
    assert not (tmp_path/"subj01/cache/sessions.h5").exists()      # raised before any session was read
    p = _betas(tree_copy, 2, 1); p.write_bytes(p.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated or corrupt"): build_fmri(tree_copy, subject=2, out_dir=tmp_path)
    p = _betas(tree_copy, 2, 2)
    with h5py.File(p, "w") as f: f["betas"] = np.zeros((750, 3, 4, 5), np.int16)
    with pytest.raises(ValueError, match="has shape"):
        from minddiffuser.nsd_data import read_session, roi_voxels
        ijk, _, grid = roi_voxels(tree_copy, 2)
        read_session(tree_copy, 2, 2, ijk, grid)


def test_real_tree_session_counts(tree_copy):
    (tree_copy/"SYNTHETIC_NSD.json").unlink()          # now it looks like real NSD to the checks
    assert check_subject(tree_copy, 1, 37) == 37
    with pytest.raises(ValueError, match="has 30 NSD sessions"): check_subject(tree_copy, 4, 37)
    with pytest.raises(ValueError, match="has 40 NSD sessions"): check_subject(tree_copy, 1, 41)
