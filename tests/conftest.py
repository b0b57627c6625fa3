import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
NBS = Path(__file__).resolve().parents[1]/"nbs"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    "A synthetic NSD tree with subjects 1 and 2, shared by the tests that only read it."
    from minddiffuser.nsd_data import write_synthetic_nsd
    return write_synthetic_nsd(tmp_path_factory.mktemp("nsd")/"nsd", subjects=(1, 2), seed=0)


@pytest.fixture(scope="session")
def demo_chain(synth_root, tmp_path_factory):
    """`minddiffuser run --subject 1` on the synthetic NSD at the demo's own sizes (the trained world), once per session.
    Its kernels draw figures (no Agg backend) without progress bars, as `tools/notebook_outputs.py` runs them, so
    its executed notebooks also serve the check that executing the chapters reproduces their committed figures."""
    from minddiffuser.chain import run_chain
    out = tmp_path_factory.mktemp("demo")/"runs"
    saved = {k: os.environ.get(k) for k in ("MPLBACKEND", "TQDM_DISABLE")}
    os.environ.pop("MPLBACKEND", None); os.environ["TQDM_DISABLE"] = "1"
    try:
        return out/"subj01", run_chain(1, data_root=synth_root, out_dir=out, progress=False)
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
