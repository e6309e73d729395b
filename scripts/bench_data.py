"""Data-engine benchmark: `medseg prepare` throughput and patch streaming from a prepared store, in one run.

    .venv/bin/python scripts/bench_data.py                 # full run (~5 min): 8 demo cases, ~1 GB and ~4 GB stores
    .venv/bin/python scripts/bench_data.py --quick         # smoke run (~1 min): 2 cases, ~50 MB and ~200 MB stores
    .venv/bin/python scripts/bench_data.py --write         # also put the results into BENCHMARKS.md

What it measures:

1. Prepare throughput. `phantoms.write_demo_dataset` writes N demo CT cases, then `prepare.prepare` (default data
   config: the median-spacing plan, i.e. realistic resolution) turns them into a store with 1 and with 2 worker
   processes. The whole call is timed (validation, fingerprint, plan, preprocessing, writing, manifest; process start
   included) and reported as cases/min, with the store's size on disk and the planned spacing and median shape.

2. Patch streaming. Two synthetic stores (~1 GB and ~4 GB on disk) are written directly with `store.create_root` and
   `store.write_case` (no NIfTI round trip): 192x192x160x1 float32 cases made from one smooth random base volume,
   rolled by a random shift per case plus a little noise (so zstd cannot shrink them much), with blob-shaped labels of
   two classes and their `prepare.class_locations`. Cases are added until the store reaches its target size. Before
   timing, every file of the store is read once, so the figures are for a WARM page cache (no disk reads).
   For each store, patch size (64^3, 128^3; float32, 1 channel) and loader worker count (0: in-process reader threads;
   1, 2: grain mp_prefetch processes) the `loader.make_dataset` pipeline over a `PatchSampler` (batch 2, foreground
   oversampling 0.33) is iterated: the first batch and a warm-up period are discarded (worker start, buffers filling),
   then batch elements are counted for a fixed time -> patches/s. Each configuration runs in a fresh spawned process
   (the "loader process", as a training process would hold the loader), so memory left over from building stores or
   from earlier configurations does not blur the comparison between stores. A thread samples memory every 20 ms during
   the timed period over the loader process and all its children (grain workers): the peak of the summed RSS and of
   the summed PSS (proportional set size: shared pages split between the processes that map them, so nothing is
   counted twice). The loader process's RSS just before the loader starts is reported too. Each iterator is closed
   afterwards, and the script checks that its worker processes have exited.

The goal being checked (the data-engine issue): >= 50 patches/s of 128^3 from a warm page cache on a 2-core machine,
and peak RSS while streaming under 1.5 GB and not growing from the 1 GB store to the 4 GB store.

Everything is written under --workdir (default /tmp/medseg_bench_data), removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

# Only what a loader process needs is imported here: spawned processes (each configuration's loader process and grain's
# workers) re-import this module, and heavier imports (scipy, phantoms, prepare) would inflate their memory figures.
from medseg_jax import fileio
from medseg_jax.data import loader
from medseg_jax.data import store as store_lib

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Data engine (scripts/bench_data.py)"
CASE_SHAPE = (192, 192, 160)  # one channel: 192*192*160*4 B = 23.6 MB of float32 per case
CHUNK_SHAPE = (32, 32, 32)
PATCH_SIZES = (64, 128)
WORKER_COUNTS = (0, 1, 2)
BATCH_SIZE = 2
OVERSAMPLE = 0.33
SAMPLE_INTERVAL_S = 0.02
GOAL_PATCHES_PER_S = 50.0  # 128^3 patches, warm page cache, 2 cores
GOAL_PEAK_RSS = 1.5e9
GOAL_RSS_GROWTH = 0.10  # "not growing": peak RSS on the large store at most 10% above the small store's
MB, GB = 1e6, 1e9


# --- small helpers --------------------------------------------------------------------------------------------------

def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under `path` (what `du` counts)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def warm_page_cache(path: Path, block: int = 16 << 20) -> int:
    """Reads every file under `path` once (so later reads hit the page cache); returns the bytes read."""
    total = 0
    buffer = bytearray(block)
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total


def human(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / MB:.0f} MB"


def machine() -> str:
    model = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def versions() -> str:
    return (f"Python {platform.python_version()}, tensorstore {importlib.metadata.version('tensorstore')}, "
            f"grain {importlib.metadata.version('grain')}")


# --- 1. prepare throughput ------------------------------------------------------------------------------------------

@dataclass
class PrepareResult:
    workers: int
    cases: int
    seconds: float
    store_bytes: int
    plan: dict

    @property
    def cases_per_min(self) -> float:
        return 60.0 * self.cases / self.seconds


def bench_prepare(workdir: Path, num_cases: int, worker_counts=(1, 2)) -> list[PrepareResult]:
    from medseg_jax.data import fingerprint, phantoms, prepare

    source = workdir / "demo_ct"
    print(f"writing {num_cases} demo CT cases to {source}")
    phantoms.write_demo_dataset(source, "ct", num_train=num_cases, num_test=0, seed=0)
    results = []
    for workers in worker_counts:
        out = workdir / f"prepared_w{workers}"
        start = time.perf_counter()
        summary = prepare.prepare(source, out, fingerprint.default_data_config(), workers=workers)
        seconds = time.perf_counter() - start
        results.append(PrepareResult(workers, summary["cases"], seconds, disk_bytes(out), summary["plan"]))
    return results


# --- 2. synthetic stores --------------------------------------------------------------------------------------------

def smooth_volume(shape, rng: np.random.Generator) -> np.ndarray:
    """Smooth random float32 volume (zero mean, unit std): a few octaves of upsampled noise, like soft tissue."""
    from scipy import ndimage

    volume = np.zeros(shape, np.float32)
    for factor, weight in ((32, 1.0), (8, 0.5), (2, 0.25)):
        coarse = rng.standard_normal([-(-s // factor) + 1 for s in shape]).astype(np.float32)
        fine = ndimage.zoom(coarse, factor, order=1)  # trilinear: fast, smooth enough
        volume += weight * fine[tuple(slice(0, s) for s in shape)]
    volume -= volume.mean()
    volume /= volume.std()
    return volume


def blob_label(volume: np.ndarray) -> np.ndarray:
    """Two foreground classes: the top 3% (class 1) and the bottom 2% (class 2) of a smooth volume -> blobs."""
    label = np.zeros(volume.shape, np.uint8)
    low, high = np.quantile(volume[::4, ::4, ::4], [0.02, 0.97])
    label[volume > high] = 1
    label[volume < low] = 2
    return label


def case_meta(case_id: str, shape, label: np.ndarray, offsets: dict) -> dict:
    """The case record `prepare` writes, for a case already on a 1 mm canonical grid with nothing cropped."""
    counts = np.bincount(label.ravel(), minlength=3)
    identity = np.eye(4).tolist()
    return {
        "case_id": case_id,
        "shape": list(shape),
        "num_channels": 1,
        "source": {"images": [], "label": None},
        "geometry": {"affine": identity, "shape": list(shape), "to_canonical": [[0, 1], [1, 1], [2, 1]],
                     "spacing": [1.0, 1.0, 1.0], "canonical_affine": identity, "spatial_header": None},
        "canonical_shape": list(shape),
        "spacing": [1.0, 1.0, 1.0],
        "crop_box": [[0, s] for s in shape],
        "class_voxels": {str(c): int(n) for c, n in enumerate(counts) if n},
        "class_locations": offsets,
    }


def build_synthetic_store(root: Path, target_bytes: int, base: np.ndarray, seed: int = 0) -> int:
    """Writes cases made from `base` (shifted, plus noise) into a new store at `root` until it takes `target_bytes`
    on disk; returns the case count."""
    from tqdm.auto import tqdm

    from medseg_jax.data import prepare

    rng = np.random.default_rng(seed)
    base_label = blob_label(base)
    store_lib.create_root(root)
    plan = {"normalization": [{"scheme": "none"}], "labels": {"0": "background", "1": "a", "2": "b"},
            "channel_names": {"0": "synthetic"}, "modality": "synthetic", "chunk_shape": list(CHUNK_SHAPE),
            "target_spacing": [1.0, 1.0, 1.0], "median_shape_after_resampling": list(CASE_SHAPE)}
    fileio.write_json(root / "plans.json", plan)
    ctx = store_lib.context()
    metas, written = [], disk_bytes(root)
    with tqdm(total=target_bytes, desc=f"building {root.name}", unit="B", unit_scale=True, dynamic_ncols=True) as bar:
        while written < target_bytes:
            case_id = f"synthetic_{len(metas):04d}"
            shift = tuple(int(s) for s in rng.integers(0, CASE_SHAPE))
            image = np.roll(base, shift, axis=(0, 1, 2))
            image += 0.05 * rng.standard_normal(CASE_SHAPE, np.float32)  # defeats repeated-content compression
            label = np.roll(base_label, shift, axis=(0, 1, 2))
            locations, offsets = prepare.class_locations(label, seed=len(metas))
            meta = case_meta(case_id, CASE_SHAPE, label, offsets)
            store_lib.write_case(root, case_id, image[..., None], label, locations, meta, CHUNK_SHAPE, ctx)
            metas.append(meta)
            size = disk_bytes(root / "cases" / case_id)
            written += size
            bar.update(size)
    case_ids = [m["case_id"] for m in metas]
    fileio.write_json(root / "prepare.json", {"format": store_lib.FORMAT, "dataset": "synthetic", "source": None,
                                              "data_config": None, "cases": case_ids, "problems": []})
    fileio.write_json(root / "manifest.json", {"format": store_lib.FORMAT, "dataset": "synthetic", "source_root": "",
                                               "cases": metas})
    return len(metas)


# --- 2. patch streaming ---------------------------------------------------------------------------------------------

class MemorySampler:
    """Background thread: peak summed RSS and PSS of this process and all its descendants, every `interval` s."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _sample(self) -> None:
        main = psutil.Process()
        rss = pss = 0
        for proc in [main, *main.children(recursive=True)]:
            try:
                info = proc.memory_full_info()  # Linux: reads /proc/PID/smaps_rollup (rss, pss, uss, ...)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a process that exited between listing and reading
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()  # at least one sample, taken at the end of the timed period


@dataclass
class StreamResult:
    store: str
    store_bytes: int
    cases: int
    patch: int
    workers: int
    patches_per_s: float
    first_batch_s: float
    rss_before: int
    peak_rss: int
    peak_pss: int
    left_running: list[int]  # loader worker pids still alive 5 s after the iterator was closed (should be none)


def bench_stream(root: Path, store_bytes: int, patch: int, workers: int, warmup_s: float,
                 seconds: float) -> StreamResult:
    """One configuration, measured in the calling process (run it with `run_isolated`)."""
    store = store_lib.Store(root)
    sampler = loader.PatchSampler(store, store.case_ids, (patch,) * 3, batch_size=BATCH_SIZE, oversample=OVERSAMPLE,
                                  seed=0)
    rss_before = psutil.Process().memory_info().rss
    dataset = loader.make_dataset(sampler, num_steps=10**7, workers=workers)
    iterator = iter(dataset)
    try:
        start = time.perf_counter()
        next(iterator)
        first_batch_s = time.perf_counter() - start
        warm_until = time.perf_counter() + warmup_s
        while time.perf_counter() < warm_until:
            next(iterator)
        count = 0
        with MemorySampler() as memory:
            start = now = time.perf_counter()
            while now - start < seconds:
                count += next(iterator)["image"].shape[0]
                now = time.perf_counter()
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops grain's threads and worker processes
    return StreamResult(root.name, store_bytes, len(store.case_ids), patch, workers, count / (now - start),
                        first_batch_s, rss_before, memory.peak_rss, memory.peak_pss, live_children())


def _is_helper(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker: one per process tree, lives as long as its parent (not a worker)."""
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return True


def live_children(timeout: float = 5.0) -> list[int]:
    """Waits up to `timeout` s for this process's children (other than helpers) to exit; returns the pids left."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.status() != psutil.STATUS_ZOMBIE and not _is_helper(proc):
                    alive.append(proc.pid)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def run_isolated(fn, *args):
    """fn(*args) in a fresh spawned process (no memory left over from store building or earlier configurations)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# --- report ---------------------------------------------------------------------------------------------------------

def goals(streams: list[StreamResult]) -> list[str]:
    """One line per goal of the issue: met or not, with the figures behind it."""
    stores = sorted({(s.store_bytes, s.store) for s in streams})
    small, large = stores[0][1], stores[-1][1]
    lines = []
    for name in (small, large):
        best = max((s for s in streams if s.store == name and s.patch == 128), key=lambda s: s.patches_per_s)
        met = best.patches_per_s >= GOAL_PATCHES_PER_S
        lines.append(f"throughput, 128³, {human(best.store_bytes)} store: best {best.patches_per_s:.1f} patches/s "
                     f"({best.workers} workers) — goal ≥ {GOAL_PATCHES_PER_S:.0f}: {'met' if met else 'NOT met'}")
    worst = max(streams, key=lambda s: s.peak_rss)
    lines.append(f"peak RSS while streaming: at most {human(worst.peak_rss)} ({worst.patch}³, {worst.workers} "
                 f"workers, {human(worst.store_bytes)} store) — goal < {human(GOAL_PEAK_RSS)}: "
                 f"{'met' if worst.peak_rss < GOAL_PEAK_RSS else 'NOT met'}")
    growths = []
    for s in streams:
        if s.store != large:
            continue
        ref = next((r for r in streams if r.store == small and r.patch == s.patch and r.workers == s.workers), None)
        if ref is not None:
            growths.append((s.peak_rss / ref.peak_rss - 1.0, s))
    if growths:
        growth, s = max(growths, key=lambda g: g[0])
        lines.append(f"peak RSS growth from the smaller to the larger store: at most {100 * growth:+.1f}% "
                     f"({s.patch}³, {s.workers} workers) — goal ≤ {100 * GOAL_RSS_GROWTH:.0f}%: "
                     f"{'met' if growth <= GOAL_RSS_GROWTH else 'NOT met'}")
    return lines


def report(prepares: list[PrepareResult], streams: list[StreamResult], num_cases: int, warmup_s: float,
           seconds: float) -> str:
    plan = prepares[0].plan
    spacing = "×".join(f"{v:.3g}" for v in plan["target_spacing"])
    shape = "×".join(str(v) for v in plan.get("median_shape_after_resampling", []))
    lines = [
        SECTION,
        "",
        f"- {datetime.date.today().isoformat()}, {machine()}; {versions()}.",
        f"- Command: `{shlex.join(sys.orig_argv)}`",
        "",
        f"Prepare: {num_cases} demo CT phantoms (`write_demo_dataset`), default data config (planned target spacing "
        f"{spacing} mm, median shape {shape}); the whole `prepare()` call timed, process start included.",
        "",
        "| workers | cases | wall | cases/min | store on disk |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in prepares:
        lines.append(f"| {p.workers} | {p.cases} | {p.seconds:.1f} s | {p.cases_per_min:.0f} "
                     f"| {human(p.store_bytes)} |")
    lines += [
        "",
        f"Patch streaming: synthetic stores of {CASE_SHAPE[0]}×{CASE_SHAPE[1]}×{CASE_SHAPE[2]}×1 float32 cases "
        f"({'×'.join(map(str, CHUNK_SHAPE))} zstd chunks), WARM page cache (every file read once before timing); "
        f"`make_dataset` over `PatchSampler` (batch {BATCH_SIZE}, oversample {OVERSAMPLE}); first batch and "
        f"{warmup_s:g} s discarded, then {seconds:g} s counted. Each configuration runs in a fresh process; RSS "
        f"before: that process just before the loader starts; peaks: summed over it and its children (grain "
        f"workers), sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms during the counted period.",
        "",
        "| store on disk | cases | patch | workers | patches/s | first batch | RSS before | peak RSS (sum) "
        "| peak PSS (sum) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in streams:
        lines.append(f"| {human(s.store_bytes)} | {s.cases} | {s.patch}³ | {s.workers} | {s.patches_per_s:.1f} "
                     f"| {s.first_batch_s:.1f} s | {human(s.rss_before)} | {human(s.peak_rss)} "
                     f"| {human(s.peak_pss)} |")
    leaked = sorted({pid for s in streams for pid in s.left_running})
    lines += ["", f"Worker processes still running 5 s after `close()`: {leaked or 'none'}.",
              "", "Goals (data-engine issue):", ""] + [f"- {line}" for line in goals(streams)]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replaces the `SECTION` heading's section of `path` (up to the next `## ` heading) or appends it."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    fileio.write_text(path, text)


# --- main -----------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (~1 min): 2 demo cases, ~50 MB and ~200 MB "
                        "stores, 0.25 s warm-up, 1.5 s counted per config")
    parser.add_argument("--write", action="store_true", help=f"put the results into BENCHMARKS.md ('{SECTION}')")
    parser.add_argument("--seconds", type=float, default=None, help="counted seconds per config (10; --quick: 1.5)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds discarded after the first batch, per config (2; --quick: 0.25)")
    parser.add_argument("--cases", type=int, default=None, help="demo cases to prepare (8; --quick: 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/medseg_bench_data"),
                        help="where the datasets and stores go (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir at the end")
    args = parser.parse_args(argv)
    # --quick: 12 streaming configurations, each in a fresh process (~1.5 s to start, ~1 s more for grain workers)
    seconds = args.seconds or (1.5 if args.quick else 10.0)
    warmup_s = args.warmup if args.warmup is not None else (0.25 if args.quick else 2.0)
    num_cases = args.cases or (2 if args.quick else 8)
    store_targets = (50 * MB, 200 * MB) if args.quick else (1 * GB, 4 * GB)

    workdir = args.workdir
    if workdir.exists() and any(workdir.iterdir()):
        print(f"{workdir}: not empty; choose another --workdir or delete it", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < 1.2 * sum(store_targets) + 1 * GB:
        print(f"{workdir}: {human(free)} free, not enough for {human(sum(store_targets))} of stores", file=sys.stderr)
        return 2
    try:
        prepares = bench_prepare(workdir, num_cases)
        for p in prepares:
            print(f"prepare, {p.workers} workers: {p.cases} cases in {p.seconds:.1f} s = {p.cases_per_min:.0f} "
                  f"cases/min; store {human(p.store_bytes)}")

        streams: list[StreamResult] = []
        base = smooth_volume(CASE_SHAPE, np.random.default_rng(0))
        for index, target in enumerate(store_targets):
            root = workdir / f"synthetic_{human(target).replace(' ', '')}"
            build_synthetic_store(root, int(target), base, seed=index)
            store_bytes = disk_bytes(root)
            read = warm_page_cache(root)
            print(f"{root.name}: {human(store_bytes)} on disk, {human(read)} read to warm the page cache")
            for patch in PATCH_SIZES:
                for workers in WORKER_COUNTS:
                    result = run_isolated(bench_stream, root, store_bytes, patch, workers, warmup_s, seconds)
                    streams.append(result)
                    print(f"  {patch}³, {workers} workers: {result.patches_per_s:.1f} patches/s, first batch "
                          f"{result.first_batch_s:.1f} s, peak RSS {human(result.peak_rss)}, peak PSS "
                          f"{human(result.peak_pss)}", flush=True)
                    if result.left_running:
                        print(f"  warning: loader processes {result.left_running} still running 5 s after close",
                              file=sys.stderr)
        left = live_children()
        if left:
            print(f"warning: child processes {left} still running at the end", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    section = report(prepares, streams, num_cases, warmup_s, seconds)
    print()
    print(section)
    if args.write:
        write_section(REPO / "BENCHMARKS.md", section)
        print(f"wrote '{SECTION}' into {REPO / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
