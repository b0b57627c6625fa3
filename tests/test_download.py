"""Integration tests of `minddiffuser download` against a local HTTP server (loopback only)."""
import hashlib
import threading
import warnings
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from minddiffuser.download import (DownloadError, FetchConfig, download_file, download_main, download_subject,
                                   fetch_coco_captions, subject_files)
from minddiffuser.nsd_data import load_manifest, write_synthetic_nsd

FAST = FetchConfig(retries=3, backoff=0.0, timeout=5.0, chunk_size=2**14)


class RangeHandler(SimpleHTTPRequestHandler):
    "Static files with `Range: bytes=N-`; the server holds the request log and the fault knobs."
    def log_message(self, *args): pass

    def do_HEAD(self):
        self.server.seen.append(("HEAD", self.path, None))
        super().do_HEAD()

    def do_GET(self):
        srv, rng = self.server, self.headers.get("Range")
        srv.seen.append(("GET", self.path, rng))
        p = Path(self.translate_path(self.path))
        if not p.is_file(): return self.send_error(404, "Not Found")
        data, start = p.read_bytes(), 0
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cuts = srv.drops.get(self.path)
        if cuts:  # promise the whole body, send `cut` bytes, close the connection
            self.wfile.write(body[:cuts.pop(0)])
            self.close_connection = True
            return
        self.wfile.write(body)


class Bucket:
    "A threaded loopback server over `root`, with its request log."
    def __init__(self, root):
        self.root = Path(root)
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(root)))
        self.srv.seen, self.srv.drops, self.srv.ranges = [], {}, True
        self.url = f"http://127.0.0.1:{self.srv.server_port}"
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def seen(self): return self.srv.seen
    def gets(self): return [s for s in self.seen if s[0] == "GET"]
    def close(self): self.srv.shutdown(); self.srv.server_close()


def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture
def bucket(tmp_path):
    "A fake NSD bucket for subject 1, two sessions, random bytes; yields (server, entries with size and sha256, coco url)."
    src, rng = tmp_path/"bucket", np.random.default_rng(0)
    entries = []
    for e in subject_files(1, n_sessions=2):
        p = src/e["path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.bytes(int(rng.integers(200_000, 400_000))))
        entries.append({**e, "size": p.stat().st_size, "sha256": sha(p)})
    coco = load_manifest()["files"]["coco"][0]
    with zipfile.ZipFile(src/coco["archive"], "w") as z:
        z.writestr("annotations/instances_val2017.json", "not wanted")
        for name in coco["members"]: z.writestr(name, f'{{"source": "{name}"}}')
    b = Bucket(src)
    yield b, entries, f"{b.url}/{coco['archive']}"
    b.close()


def fetch_all(b, entries, coco_url, root, **kw):
    return download_subject(1, root, base_url=b.url, coco_url=coco_url, files=entries, progress=False, cfg=FAST, **kw)


def test_subject_files_expands_templates_and_checks_input():
    fs = subject_files(7, n_sessions=37)
    assert len(fs) == 6 + 3 + 37
    assert fs[6]["path"] == "nsddata/ppdata/subj07/func1pt8mm/roi/Kastner2015.nii.gz"
    assert fs[-1]["path"].endswith("subj07/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session37.hdf5")
    assert len(subject_files(8)) == 6 + 3 + 30
    with pytest.raises(ValueError, match="not in the manifest"): subject_files(9)
    with pytest.raises(ValueError, match="1 <= n_sessions <= 32"): subject_files(3, n_sessions=40)


def test_full_download_equals_source(bucket, tmp_path):
    b, entries, coco_url = bucket
    root = tmp_path/"nsd"
    res = fetch_all(b, entries, coco_url, root)
    assert sorted(res["downloaded"]) == sorted(e["path"] for e in entries)
    for e in entries: assert (root/e["path"]).read_bytes() == (b.root/e["path"]).read_bytes()
    dest = root/"nsddata_stimuli/stimuli/nsd/annotations"
    assert sorted(p.name for p in dest.iterdir()) == ["captions_train2017.json", "captions_val2017.json"]
    assert (dest/"captions_val2017.json").read_text() == '{"source": "annotations/captions_val2017.json"}'
    assert not list(root.rglob("*.part")) and not (root/"_downloads"/"annotations_trainval2017.zip").exists()


def test_rerun_downloads_nothing(bucket, tmp_path):
    b, entries, coco_url = bucket
    root = tmp_path/"nsd"
    fetch_all(b, entries, coco_url, root)
    b.seen.clear()
    res = fetch_all(b, entries, coco_url, root)
    assert b.seen == [] and len(res["skipped"]) == len(entries)
    # the manifest's own entries carry no sizes: completeness comes from HEAD, still no GET
    res = download_subject(1, root, n_sessions=2, base_url=b.url, coco_url=coco_url, progress=False, cfg=FAST)
    assert b.gets() == [] and {s[0] for s in b.seen} == {"HEAD"} and len(res["skipped"]) == len(entries)


def test_interrupted_transfer_resumes_with_range(bucket, tmp_path):
    b, entries, _ = bucket
    e = entries[-1]
    path = "/" + e["path"]
    b.srv.drops[path] = [100_000]  # the first GET dies after 100 kB
    dest = tmp_path/"nsd"/e["path"]
    assert download_file(b.url + path, dest, e["size"], e["sha256"], progress=False, cfg=FAST) == "resumed"
    assert [s[2] for s in b.gets()] == [None, "bytes=100000-"]
    assert dest.read_bytes() == (b.root/e["path"]).read_bytes()
    assert not dest.with_suffix(".hdf5.part").exists()


def test_truncated_part_resumes_with_range(bucket, tmp_path):
    b, entries, coco_url = bucket
    e = entries[0]
    dest = tmp_path/"nsd"/e["path"]
    dest.parent.mkdir(parents=True)
    dest.with_suffix(dest.suffix + ".part").write_bytes((b.root/e["path"]).read_bytes()[:12_345])
    res = fetch_all(b, entries, coco_url, tmp_path/"nsd")
    assert res["resumed"] == [e["path"]]
    assert ("GET", "/" + e["path"], "bytes=12345-") in b.seen
    assert dest.read_bytes() == (b.root/e["path"]).read_bytes()


def test_complete_part_of_unknown_size_is_finished(bucket, tmp_path):
    "A .part already holding the whole file: the server answers 416 and the part is moved into place."
    b, entries, _ = bucket
    e = entries[1]
    dest = tmp_path/"x"/"file.bin"
    dest.parent.mkdir()
    dest.with_suffix(".bin.part").write_bytes((b.root/e["path"]).read_bytes())
    assert download_file(f"{b.url}/{e['path']}", dest, progress=False, cfg=FAST) == "resumed"
    assert sha(dest) == e["sha256"]


def test_server_ignoring_range_restarts_cleanly(bucket, tmp_path):
    b, entries, _ = bucket
    b.srv.ranges = False
    e = entries[-2]
    dest = tmp_path/"nsd"/e["path"]
    dest.parent.mkdir(parents=True)
    dest.with_suffix(dest.suffix + ".part").write_bytes(b"stale bytes from elsewhere")
    assert download_file(f"{b.url}/{e['path']}", dest, e["size"], e["sha256"], progress=False, cfg=FAST) == "downloaded"
    assert b.gets()[0][2] is not None  # it asked for a range, got 200, and started over
    assert dest.read_bytes() == (b.root/e["path"]).read_bytes()


def test_corrupt_complete_file_is_detected_and_refetched(bucket, tmp_path):
    b, entries, coco_url = bucket
    root = tmp_path/"nsd"
    fetch_all(b, entries, coco_url, root)
    e = entries[-1]
    bad = bytearray((root/e["path"]).read_bytes())
    bad[5000:5016] = bytes(x ^ 0xFF for x in bad[5000:5016])
    (root/e["path"]).write_bytes(bad)
    b.seen.clear()
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        res = fetch_all(b, entries, coco_url, root)
    assert res["downloaded"] == [e["path"]] and len(res["skipped"]) == len(entries) - 1
    assert b.gets() == [("GET", "/" + e["path"], None)]
    assert (root/e["path"]).read_bytes() == (b.root/e["path"]).read_bytes()


def test_404_is_a_clear_error_before_any_transfer(bucket, tmp_path):
    b, entries, coco_url = bucket
    with pytest.raises(DownloadError, match=r"nsddata/missing\.mat answered 404.*base URL"):
        download_file(f"{b.url}/nsddata/missing.mat", tmp_path/"missing.mat", progress=False, cfg=FAST)
    extra = {"path": "nsddata/missing.mat", "size": None, "sha256": None}
    b.seen.clear()
    with pytest.raises(DownloadError, match="404"):
        fetch_all(b, entries + [extra], coco_url, tmp_path/"nsd")
    assert b.gets() == [] and not (tmp_path/"nsd").exists()
    with pytest.raises(DownloadError, match="404.*--coco-url"):
        fetch_coco_captions(tmp_path/"nsd", url=f"{b.url}/nope.zip", progress=False, cfg=FAST)


def test_wrong_hash_or_size_from_server_is_rejected(bucket, tmp_path):
    b, entries, _ = bucket
    e = entries[0]
    url, dest = f"{b.url}/{e['path']}", tmp_path/"f.mat"
    with pytest.raises(DownloadError, match="SHA-256"):
        download_file(url, dest, e["size"], "0" * 64, progress=False, cfg=FAST)
    assert not dest.exists() and not dest.with_suffix(".mat.part").exists()
    with pytest.raises(DownloadError, match=r"is \d+ bytes but data_manifest.yaml says"):
        download_file(url, dest, e["size"] + 1, progress=False, cfg=FAST)


def test_retries_are_bounded_and_keep_the_part(bucket, tmp_path):
    b, entries, _ = bucket
    e = entries[-1]
    b.srv.drops["/" + e["path"]] = [1000, 1000, 1000]
    dest = tmp_path/"f.hdf5"
    with pytest.raises(DownloadError, match="failed 2 times.*Rerun to resume"):
        download_file(f"{b.url}/{e['path']}", dest, e["size"], e["sha256"], progress=False, cfg=FetchConfig(retries=1, backoff=0.0))
    assert len(b.gets()) == 2 and dest.with_suffix(".hdf5.part").stat().st_size == 2000
    assert download_file(f"{b.url}/{e['path']}", dest, e["size"], e["sha256"], progress=False, cfg=FAST) == "resumed"
    assert sha(dest) == e["sha256"]


def test_cli_fetches_the_synthetic_tree(tmp_path, capsys):
    "The command, with the manifest's own entries (no sizes or hashes), mirrors a synthetic NSD served locally."
    src = write_synthetic_nsd(tmp_path/"syn", subjects=(1,))
    coco = load_manifest()["files"]["coco"][0]
    with zipfile.ZipFile(tmp_path/coco["archive"], "w") as z:
        for name in coco["members"]: z.write(src/coco["dest"]/Path(name).name, name)
    b, a = Bucket(src), Bucket(tmp_path)
    try:
        argv = ["--subject", "1", "--data-root", str(tmp_path/"nsd"), "--n-sessions", "2", "--base-url", b.url,
                "--coco-url", f"{a.url}/{coco['archive']}", "--quiet"]
        assert download_main(argv) == 0
        assert "downloaded: 11 files" in capsys.readouterr().out
        want = [e["path"] for e in subject_files(1, n_sessions=2)]
        want += [f"{coco['dest']}/{Path(n).name}" for n in coco["members"]]
        for rel in want: assert sha(tmp_path/"nsd"/rel) == sha(src/rel), rel
        b.seen.clear(), a.seen.clear()
        assert download_main(argv) == 0
        assert "skipped: 11 files" in capsys.readouterr().out and b.gets() == [] and a.seen == []
    finally:
        b.close(), a.close()
