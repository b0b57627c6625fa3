"""Stage 2's cost: seconds per iteration and peak memory per image, by batch size, checkpointing and back-propagation depth.

Each configuration runs in its own subprocess (so peak memory is its own): the networks are built, one warm-up
iteration runs, then the timed iterations (forward through sampler, VAE decoder and CLIP, loss, backward).
Peak memory is the increase over what the process held just before the timed iterations — on CUDA
`torch.cuda.max_memory_allocated`, on the CPU the resident-set high-water mark (`VmHWM` in /proc/self/status,
reset through /proc/self/clear_refs), which sees torch's allocations where tracemalloc does not.

On the CPU the networks have Stable Diffusion's *topology* at reduced width (see `REDUCED`): the same blocks,
levels, attention placement and 35 denoising steps, with channels divided by ten (eight for the VAE) and 16×16
latents (`--latent`); configurations whose peak, extrapolated from batch 1, exceeds `--mem-budget` are skipped. On CUDA
they have SD v1-4's and ViT-B/32's full sizes (random weights: the cost does not depend on them) and 64×64
latents. Every figure is printed with its ratio to the batch-1, no-checkpointing, full-depth baseline measured
in the same run.

    python bench/stage2.py --quick            # a minute: batches 1 and 2, 7 denoising steps
    python bench/stage2.py                    # CPU: batches 1/4/16, the authors' 35 steps (~8 min on 2 cores)
    python bench/stage2.py --device cuda      # GPU: full-size networks
    python bench/stage2.py --full-size        # CPU, full size: SD v1-4 and ViT-B/32 twins loaded from disk, batch 1
                                              # (writes them once to runs/full_size_twins; ~40 min per iteration on 2 cores)

`--full-size` loads seeded random-weight twins with SD v1-4's and ViT-B/32's exact configs through the real loaders
(`write_full_size_twins`, `load_models(folder, checkpoint)`) and times the authors' configuration: one image, 64x64
latents, back-propagation through all 35 denoising steps with checkpointing. No warm-up iteration (it would cost as
much as a timed one); the peak is also given as the whole process's resident-set high-water mark. It sets glibc's
mmap threshold to 64 KiB (as `MALLOC_MMAP_THRESHOLD_=65536` would): by default freed activation buffers under 32 MB
stay in the heap, and the resident set grows step after step until the kernel kills the process (at 24 GB on a
24 GB machine, 7.5 min into the first iteration). On the reduced topology at 64x64 latents the same setting cut the peak above the
loaded networks from 2250 to 842 MiB, at 9% more time.
"""
import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280),
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
               cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)  # SD v1-4's unet/config.json
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)  # SD v1-4's vae
SD_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
               bos_token_id=0, eos_token_id=2, pad_token_id=1)  # CLIP ViT-L/14's text tower (only uc uses it)
VIT_B32 = dict(embed_dim=512, vision_cfg=dict(image_size=224, patch_size=32, width=768, layers=12, head_width=64),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=1))  # text tower unused


def _narrow(d:dict, f:int=10) -> dict:
    "SD's topology with channels divided by f."
    return d | dict(block_out_channels=tuple(c // f for c in d["block_out_channels"]))


FULL = dict(unet=SD_UNET, vae=SD_VAE, text=SD_TEXT, clip=VIT_B32, latent=64)
REDUCED = dict(unet=_narrow(SD_UNET) | dict(cross_attention_dim=64, norm_num_groups=8, sample_size=32),
               vae=_narrow(SD_VAE, 8) | dict(norm_num_groups=8, sample_size=256),
               text=SD_TEXT | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64),
               clip=dict(embed_dim=128, vision_cfg=dict(image_size=224, patch_size=32, width=192, layers=12, head_width=32),
                         text_cfg=VIT_B32["text_cfg"]),
               latent=16)


M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 65536  # glibc's mallopt option, and 64 KiB (MALLOC_MMAP_THRESHOLD_=65536)


def _mib(kb:int) -> float: return kb / 1024


def _status(key:str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure(spec:dict) -> dict:
    "One configuration, in this process: seconds per iteration and peak memory increase (MiB)."
    import torch
    from minddiffuser.features import FEATURE_CFG
    from minddiffuser.models import MODEL_CFG, load_models
    from minddiffuser.stage1 import STAGE1, uncond_embedding
    from minddiffuser.stage2 import Stage2Config, iteration_noise, layer_weights, stage2_forward
    dev = torch.device(spec["device"])
    if dev.type == "cpu": torch.set_num_threads(spec["threads"])
    if dev.type == "cpu" and spec["size"] == "twins":  # freed buffers back to the OS at once (see the docstring)
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    top = FULL if spec["size"] in ("full", "twins") else REDUCED
    if spec["size"] == "twins":
        from minddiffuser.models import write_full_size_twins
        sd, ck = write_full_size_twins()
        m = load_models(str(sd), str(ck), device=dev)
    else:
        mcfg = replace(MODEL_CFG, tiny_unet=top["unet"], tiny_vae=top["vae"], tiny_text_encoder=top["text"], tiny_clip=top["clip"])
        m = load_models("tiny", "tiny", device=dev, seed=0, cfg=mcfg)
    s1 = replace(STAGE1, **spec["stage1"])
    cfg = Stage2Config(checkpoint=spec["checkpoint"], grad_last_k=spec["grad_last_k"], autocast=spec["autocast"])
    B, h, D = spec["batch"], spec.get("latent") or top["latent"], m.clip_tokens * m.clip_width
    g = torch.Generator().manual_seed(0)
    masks = {k: (torch.rand(D, generator=g) < .25).to(dev) for k in FEATURE_CFG.clip_layers}
    uc = uncond_embedding(m.tokenizer, m.text_encoder, s1.max_length).detach().float()

    def inputs(n):
        tg = {k: (torch.randn(n, D, generator=g) * masks[k].cpu()).to(dev) for k in masks}
        tg["embed"] = torch.randn(n, m.clip_embed_dim, generator=g).to(dev)
        c = (torch.randn(n, s1.max_length, m.text_width, generator=g) * .5).to(dev).requires_grad_()
        z = torch.randn(n, m.latent_channels, h, h, generator=g).to(dev).requires_grad_()
        noise = torch.cat([iteration_noise(0, i, 0, (m.latent_channels, h, h)) for i in range(n)]).to(dev)
        return c, z, noise, tg, layer_weights([tg[k] for k in masks], list(masks.values()))

    def iteration(c, z, noise, tg, wts):
        images, loss = stage2_forward(m, c, z, uc, noise, tg, masks, wts, cfg, s1)
        loss.total.sum().backward()
        c.grad = z.grad = None
        del images, loss

    def sync():
        if dev.type == "cuda": torch.cuda.synchronize()
    if spec.get("warmup", True): iteration(*inputs(1 if dev.type == "cpu" else B))  # warm-up (batch 1 on the CPU: a whole iteration)
    x = inputs(B)
    gc.collect(); sync()
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev); base = torch.cuda.memory_allocated(dev)
    else:  # give freed heap back to the OS, so the resident set is what is live, then restart the high-water mark
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5"); base = _status("VmRSS")
    secs = []
    for _ in range(spec["iters"]):
        t0 = time.perf_counter(); iteration(*x); sync(); secs.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else _mib(_status("VmHWM") - base)
    total = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _mib(_status("VmHWM"))
    return dict(spec, sec_per_iter=min(secs), secs=secs, peak_mib=peak, peak_total_mib=total)  # the fastest iteration: least disturbed by other work


def run_one(spec:dict, timeout:float) -> dict:
    "`measure` in a fresh subprocess."
    try:
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired: return dict(spec, error=f"timed out after {timeout:.0f} s")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode or not line:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        return dict(spec, error="out of memory" if "out of memory" in p.stderr.lower() or p.returncode == -9 else err)
    return json.loads(line[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (reduced SD topology) or cuda (full size)")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 2 and a 10-step schedule (7 denoising steps)")
    ap.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 4 16; quick: 1 2)")
    ap.add_argument("--last-k", type=int, default=None, help="k of the last-k variant (default 5; quick: 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per configuration (default cpu 1, cuda 3)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default: cpu 16, cuda 64 as SD)")
    ap.add_argument("--mem-budget", type=float, default=None,
                    help="GiB: skip configurations whose peak, extrapolated from batch 1, would exceed it (default cpu 8)")
    ap.add_argument("--autocast", default=None, help="bf16 / fp16 autocast (CUDA)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    ap.add_argument("--full-size", action="store_true", help="CPU: SD v1-4 / ViT-B/32 twins at full size from disk, batch 1, checkpointing")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure(json.loads(a.one)))); return 0
    cuda = a.device.startswith("cuda")
    batches = a.batches or ([1, 2] if a.quick else [1, 4, 16])
    k = a.last_k or (2 if a.quick else 5)
    stage1 = dict(n_steps=10, t_enc=7, t_start=7) if a.quick else {}
    base = dict(device=a.device, size="full" if cuda else "reduced", stage1=stage1, threads=a.threads,
                iters=a.iters or (3 if cuda else 1), autocast=a.autocast, latent=a.latent or (64 if cuda else 16))
    budget = a.mem_budget or (None if cuda else 8.0)
    grid = [dict(base, batch=b, checkpoint=ck, grad_last_k=gk) for ck in (False, True) for gk in (None, k) for b in batches]
    if a.full_size:
        base |= dict(size="twins", latent=64, warmup=False)
        grid = [dict(base, batch=1, checkpoint=True, grad_last_k=None)]
        a.timeout = max(a.timeout, 4 * 3600)
    grid.sort(key=lambda s: (s["batch"], s["checkpoint"], s["grad_last_k"] is not None))  # baseline first, then batch 1
    steps = (stage1 or {}).get("t_start", 35)
    lat = base["latent"]
    print(f"stage 2 cost on {a.device} ({base['size']} SD topology, {lat}x{lat} latents, {steps} denoising steps, best of "
          f"{base['iters']} timed iteration(s) per configuration); ratios are to batch 1, no checkpointing, full depth", flush=True)
    hdr = f"{'batch':>5} {'ckpt':>5} {'backprop':>9} | {'s/iter':>8} {'s/iter/img':>10} {'ratio':>6} | {'peak MiB/img':>12} {'ratio':>6}"
    print(hdr); print("-" * len(hdr), flush=True)
    rows, ref = [], None
    for spec in grid:
        depth = "full" if spec["grad_last_k"] is None else f"last {spec['grad_last_k']}"
        head = f"{spec['batch']:>5} {'on' if spec['checkpoint'] else 'off':>5} {depth:>9} |"
        one = next((r for r in rows if "error" not in r and r["batch"] == 1 and
                    (r["checkpoint"], r["grad_last_k"]) == (spec["checkpoint"], spec["grad_last_k"])), None)
        if budget and one and one["peak_mib"] * spec["batch"] / 1024 > budget:
            print(f"{head} skipped: would need ~{one['peak_mib'] * spec['batch'] / 1024:.1f} GiB (--mem-budget {budget:g})", flush=True)
            rows.append(dict(spec, error="skipped")); continue
        r = run_one(spec, a.timeout); rows.append(r)
        if "error" in r: print(f"{head} {r['error']}", flush=True); continue
        per_s, per_m = r["sec_per_iter"] / r["batch"], r["peak_mib"] / r["batch"]
        ref = ref or (per_s, per_m)
        print(f"{head} {r['sec_per_iter']:8.2f} {per_s:10.3f} {per_s / ref[0]:6.2f} | {per_m:12.1f} {per_m / ref[1]:6.3f}", flush=True)
    ok = [r for r in rows if "error" not in r]
    get = lambda b, ck, gk: next((r for r in ok if (r["batch"], r["checkpoint"], r["grad_last_k"]) == (b, ck, gk)), None)
    mem = [(b, get(b, False, None), get(b, True, None)) for b in batches]
    mem = [(b, off["peak_mib"] / on["peak_mib"]) for b, off, on in mem if off and on]
    if a.full_size:
        for r in ok: print(f"\nfull size on {a.device} ({a.threads} threads): {r['sec_per_iter']:.0f} s per stage-2 iteration of one image "
                           f"(each timed iteration: {', '.join(f'{s:.0f} s' for s in r['secs'])}); peak memory {r['peak_mib'] / 1024:.1f} GiB "
                           f"above the loaded networks, {r['peak_total_mib'] / 1024:.1f} GiB for the whole process")
        if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
        return 0
    print("\ncheckpointing cuts peak memory by " + ", ".join(f"{x:.1f}x at batch {b}" for b, x in mem) + " (goal >= 3x)")
    one, big = get(1, True, None), get(max(batches), True, None)
    if one and big and big is not one:
        q = (big["sec_per_iter"] / big["batch"]) / one["sec_per_iter"]
        print(f"per-image time at batch {big['batch']} / batch 1 (checkpointing on): {q:.2f} (goal on a GPU <= 0.5)")
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
