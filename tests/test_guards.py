"""Guards of the real path: the command line refuses a run that cannot succeed in one line, before writing anything;
chapters refuse random weights on real NSD, planted stand-ins on a real data root, and name a missing input with the
command that makes it; `preset="authors"` changes exactly the listed decoder settings."""
import os
import subprocess
import sys
from dataclasses import asdict

import h5py
import numpy as np
import papermill as pm
import pytest

from conftest import NBS
from minddiffuser.decoders import resolve_inputs, write_fake_decoded
from minddiffuser.features import extract_features
from minddiffuser.models import load_models, world_weights
from minddiffuser.nsd_data import read_expdesign, subject_dir
from minddiffuser.ridge import PRESETS, RidgeConfig, ridge_config
from minddiffuser.runner import reconstruct
from minddiffuser.stage1 import run_stage1, stage_inputs

CLI = [sys.executable, "-c", "import sys; from minddiffuser.chain import main; sys.exit(main())", "run"]


@pytest.fixture
def no_nsd(monkeypatch):
    "No NSD configured (as on CI): the demo tree would be used."
    monkeypatch.delenv("MINDDIFFUSER_DATA", raising=False)


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _real_like(tmp_path):
    "An NSD root that is not the synthetic tree (empty: no file of a real one)."
    d = tmp_path/"real_nsd"; d.mkdir()
    return d


@pytest.mark.parametrize("args,env,says", [
    (["--subject", "9"], {}, "unknown subject 9: NSD has subjects 1-8."),
    (["--subject", "1"], {"MINDDIFFUSER_DATA": "/nonexistent"}, "NSD root /nonexistent (from $MINDDIFFUSER_DATA) does not exist"),
    (["--subject", "3"], {}, "subject 3 is not in the synthetic demo NSD (subjects 1, 2, 5, 7)"),
    (["--subject", "1", "--only", "03"], {}, "decoded.h5 is missing: 03_stage1.ipynb needs it; `minddiffuser run --subject 1 --only 02`"),
    (["--subject", "1", "--only", "04"], {}, "decoded.h5 is missing: 04_stage2.ipynb needs it"),
    (["--subject", "1", "--only", "05"], {}, "decoded.h5 is missing: 05_eval.ipynb needs it"),
    (["--subject", "1", "--only", "01"], {}, "fmri.h5 is missing: 01_features.ipynb needs it; `minddiffuser run --subject 1 --only 00`"),
    (["--subject", "1", "-p", "n_iter", "3"], {}, "no notebook of this run declares the parameter(s) n_iter"),
    (["--subject", "1", "--only", "77"], {}, "no chain notebooks match --only 77"),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, no_nsd, args, env, says):
    out = tmp_path/"runs"
    p = subprocess.run(CLI + args + ["--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "MINDDIFFUSER_DATA"} | env, timeout=1800)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("minddiffuser: error: ")
    assert says in p.stderr
    assert _tree(tmp_path) == []                                     # no demo tree, no subjNN/, no record


def test_cli_refuses_real_root_without_the_subjects_files(tmp_path, no_nsd):
    real = _real_like(tmp_path)
    p = subprocess.run(CLI + ["--subject", "1", "--data-root", str(real), "--out-dir", str(tmp_path/"runs")],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "nsd_expdesign.mat is missing from the NSD root" in p.stderr and "minddiffuser download --subject 1" in p.stderr
    assert _tree(tmp_path) == ["real_nsd"]


def test_cli_refuses_twins_on_real_data_unless_allowed(tmp_path, no_nsd):
    real, sd = _real_like(tmp_path), tmp_path/"runs/subj01"
    sd.mkdir(parents=True); (sd/"fmri.h5").touch()
    base = CLI + ["--subject", "1", "--data-root", str(real), "--out-dir", str(tmp_path/"runs"), "--only", "01", "-p", "models", "tiny"]
    p = subprocess.run(base, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 2 and "models = 'tiny' (random weights): not the paper's networks, with real NSD data" in p.stderr and "-p allow_mix true" in p.stderr
    assert _tree(tmp_path/"runs") == ["subj01", "subj01/fmri.h5"]


def _fmri_from(path, root):
    "A minimal fmri.h5 recorded as built from `root`."
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for s in ("train", "test"): f[f"{s}/nsd_id"] = np.arange(2)
        f.attrs["data_root"] = str(root.resolve())
    return path


def test_features_refuse_twins_on_real_data(tmp_path, no_nsd):
    fmri = _fmri_from(tmp_path/"runs/subj01/fmri.h5", _real_like(tmp_path))
    with pytest.raises(ValueError, match="allow_mix=True"):
        extract_features(1, out_dir=tmp_path/"runs", models="tiny", clip_model="tiny")
    assert _tree(fmri.parent) == ["fmri.h5"]


def test_features_alone_name_the_missing_input(tmp_path, no_nsd):
    with pytest.raises(FileNotFoundError, match=r"fmri.h5 is missing: run `minddiffuser run --subject 1 --only 00`"):
        extract_features(1, out_dir=tmp_path/"runs")
    assert _tree(tmp_path) == []


def test_ridge_decodes_no_stand_in_on_a_real_root(tmp_path, no_nsd):
    real = _real_like(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"fmri.h5 is missing on real NSD data .* --only 00 01"):
        resolve_inputs(tmp_path/"runs", 1, data_root=real)
    _fmri_from(tmp_path/"runs/subj01/fmri.h5", real)                 # fmri.h5 of real data, features.h5 missing
    with pytest.raises(FileNotFoundError, match=r"features.h5 is missing on real NSD data .* --only 01"):
        resolve_inputs(tmp_path/"runs", 1)
    assert _tree(tmp_path/"runs") == ["subj01", "subj01/fmri.h5"]


@pytest.mark.parametrize("stage", [run_stage1, reconstruct])
def test_stages_alone_name_the_missing_input(tmp_path, no_nsd, stage):
    with pytest.raises(FileNotFoundError, match=r"decoded.h5 is missing: run `minddiffuser run --subject 1 --only 02`"):
        stage(1, out_dir=tmp_path/"runs", progress=False)
    assert _tree(tmp_path) == []                                     # no demo tree, no subject folder


def test_stages_alone_read_the_data_root_of_their_inputs(synth_root, tmp_path, no_nsd):
    "Run alone without data_root, a stage uses the tree fmri.h5 was built from: no demo tree, no model mismatch."
    out = tmp_path/"runs"
    _fmri_from(subject_dir(out, 1)/"fmri.h5", synth_root)
    ids = np.sort(read_expdesign(synth_root)["sharedix"] - 1)[:2]
    write_fake_decoded(subject_dir(out, 1)/"decoded.h5", load_models(*world_weights(), device="cpu"), ids, latent_size=8)
    dec, synthetic, models, clip_model, _ = stage_inputs(out, 1)
    assert (synthetic, models, clip_model) == (True, *world_weights())
    with pytest.raises(ValueError, match="holds features made with models="):  # the twins are not the world
        stage_inputs(out, 1, models="tiny", clip_model="tiny")
    assert not (out/"demo_nsd").exists()


def test_authors_preset_changes_exactly_the_listed_settings():
    ours, theirs = asdict(ridge_config()), asdict(ridge_config("authors"))
    assert ours == asdict(RidgeConfig())
    assert {k for k in ours if ours[k] != theirs[k]} == set(PRESETS["authors"]) == {"x_norm", "cv_abs", "n_feat_c"}
    assert (theirs["x_norm"], theirs["cv_abs"], theirs["n_feat_c"]) == ("test", True, 250)
    assert ridge_config("authors", x_norm="train").x_norm == "train"
    with pytest.raises(ValueError, match="unknown preset"): ridge_config("paper")


def test_preset_is_a_parameter_of_chapter_02():
    params = pm.inspect_notebook(str(NBS/"02_ridge.ipynb"))
    assert params["preset"]["default"] == '"project"'
    assert all(params[k]["default"] == "None" for k in ("x_norm", "n_feat_c", "cv_abs"))  # None: the preset's value
