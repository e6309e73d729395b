"""Whole-scan prediction, NIfTI on disk to label NIfTI on disk: medseg-jax against MONAI's sliding_window_inference
with the same PyTorch network and weights, side by side in one run.

    python scripts/bench_infer.py                                   # 512x512x256 CT, patch 128x128x64, SegResNet 8
    python scripts/bench_infer.py --tta-shape 256,256,128           # TTA cases on a smaller scan (CPU time budget)
    python scripts/bench_infer.py --tiny --out /tmp/bench_infer.json  # the test suite's size, under a minute

The shared network is MONAI's SegResNet (`--filters` initial filters, group norm) with PyTorch's initial weights,
saved as a state dict and imported into a medseg run directory with `medseg_jax.transfer.importers.import_monai`, so
both sides run identical weights; the converted forward pass is checked against PyTorch's on one window batch (max abs
difference recorded). The scan is a synthetic CT (int16, air at -1000 HU, so no voxel is zero: medseg's crop to the
nonzero region keeps the whole volume) written as .nii.gz with the run's target spacing, so neither side resamples.
Both sides normalise alike (clip to [-1000, 1000] HU, minus mean -300, over std 400: the plan's "ct" scheme and the same
arithmetic in the MONAI pipeline) and use windows of `--patch`, overlap 0.5, Gaussian weighting (sigma 0.125 x patch)
and `--batch` windows per call (medseg's infer.batch_size = MONAI's sw_batch_size; both place windows alike).

Cases, each in a fresh process (its peak RSS from getrusage):
  medseg  `medseg_jax.predict.predict(run, scan, out, mirror_axes=())`, and mirror TTA `mirror_axes=(0, 1, 2)` (8 flips
          batched into one compiled call). A warm-up predict of a one-window scan first (reported as the first call:
          compilation) fills XLA's persistent compilation cache, so the timed predicts (which build their jitted
          forward anew, as every predict() call does) load the program instead of compiling it.
  MONAI   nibabel load -> the same normalisation -> torch tensor -> `sliding_window_inference(..., mode="gaussian",
          sigma_scale=0.125)` under `torch.inference_mode()` -> argmax -> nibabel save; TTA as a MONAI user writes it
          (MONAI has none built in): a predictor that runs the network on all 8 flips of each window batch,
          concatenated along the batch axis, and averages the logits flipped back. torch.set_num_threads(cpu_count).
  export  `medseg_jax.export.export_model([run], out)`: time and size on disk; `open_predictor(model=out)` timed in a
          fresh process (import + load); `predict(model=out)` on the smallest scan compared with the run's labels.

Ratios are MONAI / medseg seconds (> 1: medseg faster); the TTA factor is TTA / no-TTA seconds on the same scan.
Results are printed as a Markdown table and written as JSON (default docs/bench_infer_<platform>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Set before any worker imports jax: quiet XLA's C++ logs. (No other XLA flags: XLA:CPU uses every core by default.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLIP, MEAN, STD = (-1000.0, 1000.0), -300.0, 400.0
SPACING = (0.8, 0.8, 1.5)
TINY = dict(shape="40,40,24", patch="32,32,16", filters=4, batch=2)
SIGMA_SCALE, OVERLAP = 0.125, 0.5
FLIPS = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]  # spatial axes; all 8 combinations


def shape_arg(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text}: give three sizes, e.g. 512,512,256")
    return values


def shape_name(shape) -> str:
    return "x".join(str(s) for s in shape)


def cpu_model() -> str:
    try:
        line = next(t for t in Path("/proc/cpuinfo").read_text().splitlines() if t.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def say(text: str) -> None:
    print(f"[bench_infer {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- inputs ---------------------------------------------------------------------------------------------------------

def synthetic_ct(shape, seed: int = 0):
    """int16 CT-like volume: air -1000 HU around an elliptic body (fat, soft tissue, two organs, a bone ring), noise
    of 20 HU. No voxel is 0 in the air, so the nonzero box is the whole volume."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, s, dtype=np.float32) for s in shape)
    r2 = (x[:, None] / 0.85) ** 2 + (y[None, :] / 0.65) ** 2  # (X, Y) body cross-section
    plane = np.where(r2 < 1, 40.0, -1000.0).astype(np.float32)
    plane[(r2 < 1) & (r2 > 0.85)] = -100.0  # fat
    plane[(r2 < 0.55) & (r2 > 0.45)] = 700.0  # bone ring
    volume = np.broadcast_to(plane[:, :, None], shape).copy()
    for (cx, cy, cz), (ax, ay, az), hu in (((-0.3, 0.1, 0.0), (0.3, 0.25, 0.5), 60.0),
                                           ((0.35, -0.1, 0.2), (0.15, 0.15, 0.3), 110.0)):
        inside = (((x - cx) / ax)[:, None, None] ** 2 + ((y - cy) / ay)[None, :, None] ** 2
                  + ((z - cz) / az)[None, None, :] ** 2) < 1
        volume[inside] = hu
    volume += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return np.clip(np.round(volume), -1024, 3071).astype(np.int16)


def write_scan(path: Path, shape) -> None:
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(synthetic_ct(shape), np.diag([*SPACING, 1.0])), path)  # RAS: canonical = file order


def monai_kwargs(args, classes: int) -> dict:
    return dict(spatial_dims=3, in_channels=1, out_channels=classes, init_filters=args.filters,
                norm=("GROUP", {"num_groups": args.groups}))


def make_run(args, work: Path) -> Path:
    """The MONAI SegResNet's initial weights saved as a state dict and imported into a medseg run directory."""
    import torch
    from monai.networks.nets import SegResNet

    from medseg_jax.experiments.base import get_config as base_config
    from medseg_jax.models.registry import model_config
    from medseg_jax.transfer.importers import import_monai

    torch.manual_seed(args.seed)
    net = SegResNet(**monai_kwargs(args, args.classes)).eval()
    torch.save(net.state_dict(), work / "segresnet.pt")
    plans = {"target_spacing": list(SPACING), "labels": {str(i): f"class{i}" for i in range(args.classes)},
             "channel_names": {"0": "CT"}, "modality": "ct", "crop": "nonzero",
             "normalization": [{"scheme": "ct", "clip": list(CLIP), "mean": MEAN, "std": STD}],
             "label_resampling": "nearest"}
    (work / "plans.json").write_text(json.dumps(plans))
    config = base_config("segresnet")
    config.model = model_config("segresnet", init_filters=args.filters, num_groups=args.groups)
    config.train.patch_size = tuple(args.patch)
    config.infer.batch_size, config.infer.overlap, config.infer.mirror_axes = args.batch, OVERLAP, (0, 1, 2)
    run = work / "run"
    import_monai("segresnet", work / "segresnet.pt", run, config=config, plans_path=work / "plans.json")
    return run


def check_equal_forward(args, run: Path, scan: Path) -> dict:
    """The run's compiled forward pass against PyTorch's on one batch of windows cut from the normalised scan."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.networks.nets import SegResNet

    from medseg_jax.predict import RunMember

    image = nib.load(scan).get_fdata(dtype=np.float32)
    image = (np.clip(image, *CLIP) - MEAN) / STD
    px, py, pz = args.patch
    starts = [(0, 0, 0), tuple(max(0, s - p) // 2 for s, p in zip(image.shape, args.patch))]
    starts = (starts * args.batch)[:args.batch]
    windows = np.stack([image[a:a + px, b:b + py, c:c + pz] for a, b, c in starts])[..., None]
    member = RunMember(run, mirror_axes=())
    ours = np.asarray(member.forward(member.params, windows))
    net = SegResNet(**monai_kwargs(args, args.classes)).eval()
    net.load_state_dict(torch.load(run.parent / "segresnet.pt", weights_only=True))
    with torch.inference_mode():
        theirs = net(torch.from_numpy(np.moveaxis(windows, -1, 1).copy())).numpy()
    theirs = np.moveaxis(theirs, 1, -1)
    return {"windows": list(windows.shape), "max_abs_difference": float(np.abs(ours - theirs).max()),
            "max_abs_logit": float(np.abs(theirs).max()),
            "argmax_equal_fraction": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}


# --- workers (one fresh process per side) ---------------------------------------------------------------------------

def worker_medseg(job: dict) -> dict:
    import jax

    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    from medseg_jax.predict import predict

    def predictor(case):
        models = {"model": case["model"]} if case.get("model") else {"run_dir": job["run"]}
        axes = (0, 1, 2) if case["tta"] else ()

        def once(scan, out):
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            predict(input_path=scan, output_dir=out, mirror_axes=axes, **models)
            return time.perf_counter() - started
        return once

    return run_cases(job, predictor, {"jax_threads": "all cores (XLA:CPU default)", "jax": jax.__version__,
                                      "platform": jax.devices()[0].platform})


def worker_monai(job: dict) -> dict:
    import nibabel as nib
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SegResNet

    torch.set_num_threads(os.cpu_count())
    kwargs = dict(job["monai_kwargs"], norm=tuple(job["monai_kwargs"]["norm"]))  # (JSON made the tuple a list)
    net = SegResNet(**kwargs).eval()
    net.load_state_dict(torch.load(job["state_dict"], weights_only=True))
    dims = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]  # all flips of (N, C, D, H, W)'s D, H, W

    def mirrored(windows):  # the 8 flips in one batch, logits flipped back and averaged
        batch = windows.shape[0]
        logits = net(torch.cat([torch.flip(windows, d) if d else windows for d in dims]))
        parts = [logits[i * batch:(i + 1) * batch] for i in range(len(dims))]
        return sum(torch.flip(p, d) if d else p for p, d in zip(parts, dims)) / len(dims)

    def predictor(case):
        network = mirrored if case["tta"] else net

        def once(scan, out):
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            out.mkdir(parents=True)
            img = nib.load(scan)
            image = img.get_fdata(dtype=np.float32)
            image = (np.clip(image, *CLIP) - MEAN) / STD
            inputs = torch.from_numpy(image)[None, None]
            with torch.inference_mode():
                logits = sliding_window_inference(inputs, job["patch"], job["batch"], network, overlap=OVERLAP,
                                                  mode="gaussian", sigma_scale=SIGMA_SCALE)
                labels = torch.argmax(logits, dim=1)[0].numpy().astype(np.uint8)
            label_img = nib.Nifti1Image(labels, img.affine, header=img.header)
            label_img.set_data_dtype(np.uint8)
            nib.save(label_img, out / Path(scan).name)
            return time.perf_counter() - started
        return once

    return run_cases(job, predictor, {"torch_threads": torch.get_num_threads(), "torch": torch.__version__})


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: "5" resets VmHWM, so each case's peak is its own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mib() -> float | None:
    try:
        line = next(t for t in Path("/proc/self/status").read_text().splitlines() if t.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cases(job: dict, predictor, info: dict) -> dict:
    """Per case: a warm-up predict of the one-window scan (the first call), then `repeats` predicts of each scan; the
    labels land in job["out"]/LABEL/SCAN."""
    results = {}
    for case in job["cases"]:
        once, out = predictor(case), Path(job["out"]) / case["label"].replace(" ", "_")
        _reset_peak_rss()
        result = {"first_call_seconds": once(job["warmup"], out / "warmup"), **info, "scans": {}}
        for name, scan in case["scans"].items():
            times = [once(scan, out / name) for _ in range(job["repeats"])]
            result["scans"][name] = {"seconds": min(times), "all_seconds": times, "labels": str(out / name)}
            say(f"  {case['label']}: {name} {min(times):.1f} s (of {', '.join(f'{t:.1f}' for t in times)})")
        result["peak_rss_mib"] = _peak_rss_mib()
        say(f"  {case['label']}: first call {result['first_call_seconds']:.1f} s, peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB")
        results[case["label"]] = result
    return results


def run_worker(job: dict, work: Path) -> dict:
    path = work / f"job_{job['side']}.json"
    path.write_text(json.dumps(job))
    say(f"{job['side']}: starting a worker for {', '.join(c['label'] for c in job['cases'])} (load average "
        f"{os.getloadavg()[0]:.2f})")
    # A compilation cache of this run's own: the warm-up compiles (first call), the timed predicts load the program.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "xla_cache"))
    started = time.perf_counter()
    results = None
    with subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdout=subprocess.PIPE, text=True,
                          env=env) as proc:
        for line in proc.stdout:  # the worker's progress as it comes
            if line.startswith("RESULT "):
                results = json.loads(line[len("RESULT "):])
            else:
                print(line, end="", flush=True)
    if proc.returncode != 0 or results is None:
        raise SystemExit(f"the {job['side']} worker failed (exit {proc.returncode})")
    say(f"{job['side']}: worker done in {time.perf_counter() - started:.0f} s (load average "
        f"{os.getloadavg()[0]:.2f})")
    return results


def worker_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = worker_medseg(job) if job["side"] == "medseg" else worker_monai(job)
    print("RESULT " + json.dumps(result), flush=True)


# --- comparison -----------------------------------------------------------------------------------------------------

def equal_fraction(a: Path, b: Path) -> float:
    import nibabel as nib
    import numpy as np

    (fa,), (fb,) = list(Path(a).glob("*.nii.gz")), list(Path(b).glob("*.nii.gz"))
    la, lb = np.asarray(nib.load(fa).dataobj), np.asarray(nib.load(fb).dataobj)
    return float(np.mean(la == lb)) if la.shape == lb.shape else 0.0


def time_fresh_load(model: Path) -> dict:
    code = ("import time, sys; t0 = time.perf_counter(); from medseg_jax.predict import open_predictor; "
            "t1 = time.perf_counter(); open_predictor(model=sys.argv[1]); t2 = time.perf_counter(); "
            "print(t1 - t0, t2 - t1, 'flax' in sys.modules)")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, cwd=REPO,
                          check=True)
    wall = time.perf_counter() - started
    imports, load, flax = proc.stdout.split()[-3:]
    return {"process_seconds": wall, "import_seconds": float(imports), "open_predictor_seconds": float(load),
            "flax_imported": flax == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=shape_arg, default=(512, 512, 256), help="scan size, voxels")
    parser.add_argument("--tta-shape", type=shape_arg, help="scan for the TTA cases (default: --shape); no-TTA "
                        "cases run on it too, so each TTA factor compares one scan")
    parser.add_argument("--patch", type=shape_arg, default=(128, 128, 64))
    parser.add_argument("--filters", type=int, default=8, help="SegResNet init_filters")
    parser.add_argument("--groups", type=int, help="group-norm groups (default: min(8, filters))")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="windows per call (infer.batch_size = sw_batch_size)")
    parser.add_argument("--repeats", type=int, default=1, help="timed predicts per scan (the fastest counts)")
    parser.add_argument("--no-tta", action="store_true", help="skip the TTA cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help=f"test-suite size: {TINY}")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", help="JSON results (default docs/bench_infer_<platform>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    if args.tiny:
        args.shape, args.patch = shape_arg(TINY["shape"]), shape_arg(TINY["patch"])
        args.filters, args.batch = TINY["filters"], TINY["batch"]
    args.groups = args.groups or min(8, args.filters)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_infer_"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "xla_cache", ignore_errors=True)

    import jax

    device = jax.devices()[0]
    out_json = Path(args.out) if args.out else REPO / "docs" / f"bench_infer_{device.platform}.json"
    say(f"{datetime.date.today()} {platform.node()}: {device.platform} ({device.device_kind}), {os.cpu_count()} "
        f"CPUs, jax {jax.__version__}; scan {shape_name(args.shape)}, patch {shape_name(args.patch)}, SegResNet "
        f"init_filters {args.filters}, batch {args.batch}, repeats {args.repeats}; scratch {work}")

    tta_shape = args.tta_shape or args.shape
    no_tta_shapes = [args.shape] + ([tta_shape] if tta_shape != args.shape and not args.no_tta else [])
    scans = {}
    for name, shape in [(shape_name(s), s) for s in no_tta_shapes] + [("warmup", args.patch)]:
        scans[name] = work / "scans" / name / f"ct_{shape_name(shape)}.nii.gz"
        if not scans[name].exists():
            started = time.perf_counter()
            write_scan(scans[name], shape)
            say(f"wrote {scans[name].name} ({scans[name].stat().st_size / 2**20:.1f} MiB) in "
                f"{time.perf_counter() - started:.1f} s")
    warmup = str(scans.pop("warmup"))  # one window: compiles the same program as a whole scan

    say("importing the MONAI SegResNet into a medseg run directory")
    shutil.rmtree(work / "run", ignore_errors=True)
    run = make_run(args, work)
    forward = check_equal_forward(args, run, scans[shape_name(args.shape)])
    say(f"converted forward vs PyTorch on {forward['windows']}: max abs difference "
        f"{forward['max_abs_difference']:.2e} (logits up to {forward['max_abs_logit']:.2f})")

    say("exporting the run (medseg_jax.export.export_model)")
    from medseg_jax.export import export_model

    model = work / "exported"
    shutil.rmtree(model, ignore_errors=True)
    started = time.perf_counter()
    manifest = export_model([run], model)
    export = {"export_seconds": time.perf_counter() - started, "size_mib": manifest["size_bytes"] / 2**20,
              "platforms": manifest["platforms"], "parameters": manifest["members"][0]["parameters"]}
    export["fresh_process_load"] = time_fresh_load(model)
    say(f"export: {export['size_mib']:.2f} MiB in {export['export_seconds']:.1f} s; in a fresh process import "
        f"{export['fresh_process_load']['import_seconds']:.1f} s + open_predictor(model=...) "
        f"{export['fresh_process_load']['open_predictor_seconds']:.2f} s")

    names = [shape_name(s) for s in no_tta_shapes]
    tta_names = [] if args.no_tta else [shape_name(tta_shape)]
    smallest = shape_name(min(no_tta_shapes, key=lambda s: s[0] * s[1] * s[2]))
    common = dict(run=str(run), warmup=warmup, repeats=args.repeats, patch=list(args.patch), batch=args.batch,
                  state_dict=str(work / "segresnet.pt"), monai_kwargs=monai_kwargs(args, args.classes),
                  out=str(work / "out"))
    cases = {}
    for side in ("medseg", "monai"):
        jobs = [dict(label=f"{side} no TTA", tta=False, scans={n: str(scans[n]) for n in names})]
        jobs += [dict(label=f"{side} TTA", tta=True, scans={n: str(scans[n]) for n in tta_names})] if tta_names else []
        if side == "medseg":
            jobs.append(dict(label="medseg export no TTA", tta=False, model=str(model),
                             scans={smallest: str(scans[smallest])}))
        cases.update(run_worker(dict(common, side=side, cases=jobs), work))

    export["predict"] = cases["medseg export no TTA"]["scans"][smallest]
    export["labels_equal_to_run_fraction"] = equal_fraction(export["predict"]["labels"],
                                                            cases["medseg no TTA"]["scans"][smallest]["labels"])
    say(f"export: predict(model=...) on {smallest}: {export['predict']['seconds']:.1f} s (the run: "
        f"{cases['medseg no TTA']['scans'][smallest]['seconds']:.1f} s); labels equal to the run's: "
        f"{export['labels_equal_to_run_fraction']:.6f}")

    rows = []
    for tta in (False, True):
        if tta and args.no_tta:
            continue
        names = [shape_name(tta_shape)] if tta else [shape_name(s) for s in no_tta_shapes]
        tag = "TTA" if tta else "no TTA"
        for name in names:
            ours, theirs = cases[f"medseg {tag}"]["scans"][name], cases[f"monai {tag}"]["scans"][name]
            rows.append({"scan": name, "tta": tta, "medseg_seconds": ours["seconds"],
                         "monai_seconds": theirs["seconds"], "ratio_monai_over_medseg":
                         theirs["seconds"] / ours["seconds"],
                         "labels_equal_fraction": equal_fraction(ours["labels"], theirs["labels"])})
    tta_factors = {}
    if not args.no_tta:
        name = shape_name(tta_shape)
        for side in ("medseg", "monai"):
            tta_factors[side] = (cases[f"{side} TTA"]["scans"][name]["seconds"]
                                 / cases[f"{side} no TTA"]["scans"][name]["seconds"])

    print("\n| scan | TTA | medseg (s) | MONAI (s) | MONAI / medseg | labels equal |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scan']} | {'8 flips' if r['tta'] else 'none'} | {r['medseg_seconds']:.1f} | "
              f"{r['monai_seconds']:.1f} | {r['ratio_monai_over_medseg']:.2f} | {r['labels_equal_fraction']:.4f} |")
    print()
    for r in rows:
        print(f"ratio MONAI/medseg, {r['scan']}, {'TTA' if r['tta'] else 'no TTA'}: "
              f"{r['ratio_monai_over_medseg']:.2f}")
    for side, factor in tta_factors.items():
        print(f"TTA cost factor, {side}: {factor:.2f}")
    for label, case in cases.items():
        print(f"{label}: first call (one-window scan) {case['first_call_seconds']:.1f} s, peak RSS "
              f"{case['peak_rss_mib']:.0f} MiB")

    for case in cases.values():
        for scan in case["scans"].values():
            scan.pop("labels", None)
    export["predict"].pop("labels", None)
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {memory_gib:.0f} GiB",
        "platform": device.platform, "device_kind": device.device_kind, "jax": jax.__version__,
        "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
        "settings": {"shape": list(args.shape), "tta_shape": list(tta_shape), "patch": list(args.patch),
                     "filters": args.filters, "groups": args.groups, "classes": args.classes, "batch": args.batch,
                     "overlap": OVERLAP, "sigma_scale": SIGMA_SCALE, "repeats": args.repeats,
                     "spacing": list(SPACING), "normalization": {"clip": list(CLIP), "mean": MEAN, "std": STD},
                     "resampling": "none (plan target spacing = scan spacing)",
                     "compilation_cache": "fresh per run, shared by the workers (warm-up compiles)"},
        "forward_check": forward, "rows": rows, "tta_factor": tta_factors, "cases": cases, "export": export,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {out_json}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
