"Integration tests of chapters 02 and 02a (decoders): equality with fastl2lir, planted structure, CV selection, artifacts, resumption, bad input."
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("fastl2lir")
from minddiffuser import decoders
from minddiffuser.decoders import decode_subject, decoder_path, feature_families, load_decoder, write_planted_inputs
from minddiffuser.ridge import CVFolds, Design, RidgeConfig, cv_scores, fastl2lir_predict, fit_l2lir, top_dims


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    X = 2 + rng.normal(size=(90, 40)); X[:, 7] = -1.0            # non-centred; voxel 7 has zero variance
    Y = X[:, :6] @ rng.normal(size=(6, 9)) + rng.normal(size=(90, 9))
    return X, Y, 2 + rng.normal(size=(20, 40))


@pytest.mark.parametrize("n_feat", [0, 1, 3, 17, 39, 40, 55])
@pytest.mark.parametrize("mode", ["float64", "mixed"])
def test_equal_to_fastl2lir(data, n_feat, mode):
    X, Y, Xt = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fit_l2lir(X, Y, 0.15, n_feat, chunk=4, mode=mode, device="cpu")
    assert np.abs(m.predict(Xt).numpy() - fastl2lir_predict(X, Y, Xt, 0.15, n_feat)).max() < 1e-8
    if 0 < n_feat < 40:
        assert m.idx.shape == (9, n_feat) and (m.idx.diff(dim=1) > 0).all()       # ascending, no repeats
        assert not (m.idx == 7).any() if n_feat == 39 else True                  # the zero-variance voxel ranks last


def test_equal_to_fastl2lir_more_voxels_than_samples():
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(25, 60)), rng.normal(size=(25, 4))
    for n_feat in (0, 12):
        ours = fit_l2lir(X, Y, 0.15, n_feat, device="cpu").predict(X[:6]).numpy()
        assert np.abs(ours - fastl2lir_predict(X, Y, X[:6], 0.15, n_feat)).max() < 1e-8


def test_workers_and_chunks_do_not_change_the_fit(data):
    X, Y, Xt = data
    a = fit_l2lir(Design(X, "cpu", n_workers=1), Y, 0.15, 11, chunk=1000)
    b = fit_l2lir(Design(X, "cpu", n_workers=2), Y, 0.15, 11, chunk=2)
    assert torch.equal(a.idx, b.idx) and torch.allclose(a.w, b.w, atol=1e-12) and torch.allclose(a.predict(Xt), b.predict(Xt), atol=1e-12)


def test_bad_input(data):
    X, Y, _ = data
    Xn = X.copy(); Xn[3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"): fit_l2lir(Xn, Y, 0.15, 5, device="cpu")
    with pytest.raises(ValueError, match="same images"): fit_l2lir(X, Y[1:], 0.15, 5, device="cpu")
    with pytest.raises(ValueError, match="alpha"): fit_l2lir(X, Y, 0.0, 5, device="cpu")
    with pytest.warns(UserWarning, match="exceeds the 40 voxels"): m = fit_l2lir(X, Y, 0.15, 41, device="cpu")
    assert m.idx is None
    with pytest.raises(ValueError, match="voxels but the model"): m.predict(X[:, :30])
    with pytest.raises(ValueError, match="n_feat"): RidgeConfig(n_feat_clip=(350, -1))
    with pytest.raises(ValueError, match="x_norm"): RidgeConfig(x_norm="own")


def test_cv_prefers_signal_dims():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(400, 3))
    X = s @ rng.normal(size=(3, 80)) + rng.normal(size=(400, 80))
    Y = rng.normal(size=(400, 200))
    signal = np.sort(rng.choice(200, 50, replace=False))
    Y[:, signal] += s @ rng.normal(size=(3, 50))
    r = cv_scores(CVFolds(Design(X, "cpu"), 5), Y, 0.15, 30, chunk=64).numpy()
    keep = top_dims(r.mean(0), 0.25)
    assert len(keep) == 50 and len(np.intersect1d(keep, signal)) >= 48
    assert r.mean(0)[signal].min() > np.delete(r.mean(0), signal).max() - 0.05


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    write_planted_inputs(root/"subj01", n_train=300, n_test=50, n_voxels=300, seed=2)
    decode_subject(root, 1, RidgeConfig(n_feat_clip=(350, 250)), device="cpu", progress=False)   # layer 0: all voxels; layer 1: 250
    return root


def test_planted_structure_beats_shuffled_control(planted, tmp_path):
    shuffled = tmp_path/"subj01"; shuffled.mkdir()
    shutil.copy(planted/"subj01"/"fmri.h5", shuffled/"fmri.h5"); shutil.copy(planted/"subj01"/"features.h5", shuffled/"features.h5")
    perm = np.random.default_rng(0).permutation(300)
    with h5py.File(shuffled/"features.h5", "a") as f:                            # break the image pairing of the training set
        for k in feature_families(shuffled/"features.h5"): f[f"train/{k}"][...] = f[f"train/{k}"][:][perm]
    decode_subject(tmp_path, 1, device="cpu", progress=False)
    with h5py.File(planted/"subj01"/"decoded.h5") as real, h5py.File(shuffled/"decoded.h5") as ctrl:
        for k in feature_families(planted/"subj01"/"features.h5"):
            good, bad = np.nanmean(real[f"accuracy/{k}/per_dim"][:]), np.nanmean(ctrl[f"accuracy/{k}/per_dim"][:])
            assert good > 0.4 and abs(bad) < 0.2 and good > bad + 0.3, (k, good, bad)
            assert np.nanmean(real[f"accuracy/{k}/per_image"][:]) > 0.4


def test_planted_selection_and_artifacts(planted):
    sd = planted/"subj01"
    fams = feature_families(sd/"features.h5")
    assert list(fams) == ["c", "z", "clip/transformer.resblocks.0.mlp.c_proj", "clip/transformer.resblocks.1.mlp.c_proj", "clip/embed"]
    with h5py.File(sd/"decoded.h5") as d, h5py.File(sd/"features.h5") as f:
        assert np.array_equal(d["nsd_id"][:], f["test/nsd_id"][:])
        for k, shape in fams.items(): assert d[k].shape == (50, *shape) and d[k].dtype == np.float32
        np.testing.assert_allclose(d["c"][:, 0], np.broadcast_to(f["train/c"][:, 0].mean(0), (50, 8)), rtol=1e-5)
        for k in [k for k in fams if "resblocks" in k]:
            mask, planted_mask = d[f"clip_mask/{k[5:]}"][:], f[f"planted/{k}"][:]
            assert mask.sum() == 20 and (mask & planted_mask).sum() >= 18
            assert (d[k][:][:, ~mask] == 0).all()
            assert np.isnan(d[f"accuracy/{k}/per_dim"][:][~mask]).all()
    used = dict(zip(fams, (125, 300, 300, 250, 300)))                           # the authors' n_feat, capped at the 300 voxels
    for k in fams:
        dec = load_decoder(decoder_path(sd/"decoders", k), "cpu")
        assert dec.attrs["complete"] and dec.attrs["n_voxels"] == 300 and {"x_mean", "x_std"} <= set(dec.extra)
        assert dec.attrs["n_feat_used"] == used[k] and (dec.model.idx is None) == (used[k] == 300)
    assert not list((sd/"decoders").rglob("*.partial.h5")) and not list(sd.rglob("*.tmp"))


def test_decoders_match_a_direct_fit(planted):
    sd = planted/"subj01"
    dec = load_decoder(decoder_path(sd/"decoders", "clip/transformer.resblocks.1.mlp.c_proj"), "cpu")
    with h5py.File(sd/"fmri.h5") as f, h5py.File(sd/"features.h5") as ft:
        X, Xte = f["train/fmri"][:].astype(np.float64), f["test/fmri"][:].astype(np.float64)
        Y = ft["train/clip/transformer.resblocks.1.mlp.c_proj"][:].astype(np.float64)
    m, s = X.mean(0), X.std(0)
    ym, ys = Y.mean(0), Y.std(0)
    keep = dec.dims
    direct = fastl2lir_predict((X - m)/s, ((Y - ym)/ys)[:, keep], (Xte - m)/s, 0.15, 250)*ys[keep] + ym[keep]
    np.testing.assert_allclose(dec.predict((Xte - m)/s)[:, keep], direct, atol=1e-6)


def test_resume_after_interruption(tmp_path, monkeypatch):
    sd = write_planted_inputs(tmp_path/"subj01", n_train=200, n_test=30, n_voxels=120, seed=4)
    calls = {"n": 0}
    real = decoders.fit_l2lir
    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt("simulated interruption")
        return real(*a, **k)
    monkeypatch.setattr(decoders, "fit_l2lir", flaky)
    with pytest.raises(KeyboardInterrupt): decode_subject(tmp_path, 1, device="cpu", families=["z"], block=64, progress=False)
    assert (sd/"decoders"/"z.partial.h5").exists() and not (sd/"decoders"/"z.h5").exists()
    calls["n"] = -100
    decode_subject(tmp_path, 1, device="cpu", families=["z"], block=64, progress=False)
    assert calls["n"] == -100 + 4 - 2                                         # 4 blocks of 64 outputs, 2 already done
    monkeypatch.setattr(decoders, "fit_l2lir", real)
    fresh = tmp_path/"fresh"/"subj01"; fresh.mkdir(parents=True)
    for n in ("fmri.h5", "features.h5"): shutil.copy(sd/n, fresh/n)
    decode_subject(tmp_path/"fresh", 1, device="cpu", families=["z"], block=256, progress=False)
    with h5py.File(sd/"decoded.h5") as a, h5py.File(fresh/"decoded.h5") as b: np.testing.assert_allclose(a["z"][:], b["z"][:], atol=1e-6)
    before = (sd/"decoders"/"z.h5").stat().st_mtime_ns
    decode_subject(tmp_path, 1, device="cpu", families=["z"], block=64, progress=False)          # finished: not refit
    assert (sd/"decoders"/"z.h5").stat().st_mtime_ns == before


def test_subject_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fmri.h5 is missing: run `minddiffuser run --subject 1 --only 00`"): decode_subject(tmp_path, 1, device="cpu")
    sd = write_planted_inputs(tmp_path/"subj01", n_train=60, n_test=10, n_voxels=40, seed=1)
    with h5py.File(sd/"features.h5", "a") as f:
        del f["train/nsd_id"]; f["train/nsd_id"] = np.arange(60)
    with pytest.raises(ValueError, match="differ between fmri.h5 and features.h5"): decode_subject(tmp_path, 1, device="cpu", progress=False)
    sd = write_planted_inputs(tmp_path/"subj02", n_train=60, n_test=10, n_voxels=40, seed=1)
    with h5py.File(sd/"fmri.h5", "a") as f: f["train/fmri"][5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"): decode_subject(tmp_path, 2, device="cpu", progress=False)
    sd = write_planted_inputs(tmp_path/"subj03", n_train=60, n_test=10, n_voxels=40, n_clip=7, seed=1)
    with pytest.raises(ValueError, match="one value per layer"): decode_subject(tmp_path, 3, device="cpu", progress=False)
    with pytest.raises(KeyError, match="not in"): decode_subject(tmp_path, 3, device="cpu", families=["clip/nope"], progress=False)


def test_test_statistics_option(planted, tmp_path):
    sd = tmp_path/"subj01"; sd.mkdir()
    for n in ("fmri.h5", "features.h5"): shutil.copy(planted/"subj01"/n, sd/n)
    shutil.copytree(planted/"subj01"/"decoders", sd/"decoders")
    with h5py.File(sd/"fmri.h5", "a") as f: f["test/fmri"][...] = f["test/fmri"][:]*3 + 5             # a test-set scanner drift
    out = decode_subject(tmp_path, 1, RidgeConfig(n_feat_clip=(350, 250), x_norm="test"), device="cpu", progress=False)
    with h5py.File(out) as d, h5py.File(planted/"subj01"/"decoded.h5") as ref:
        assert d.attrs["x_norm"] == "test"
        assert np.nanmean(d["accuracy/z/per_dim"][:]) > 0.4                        # the test statistics absorb the drift
        assert not np.allclose(d["z"][:], ref["z"][:])
