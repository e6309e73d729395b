"""The prepared-dataset store: one tensorstore zarr3 hierarchy holding every preprocessed case.

    STORE/zarr.json                 zarr3 group; attributes {"medseg_store": {"format": 1}}
    STORE/prepare.json              what was prepared: source files (size, mtime), data config, good cases, problems
    STORE/fingerprint.json          dataset fingerprint (`data/fingerprint.py`)
    STORE/plans.json                preprocessing plan
    STORE/validation_report.tsv     bad cases left out (only with --skip-bad)
    STORE/manifest.json             every prepared case's record (written when all cases are in): the newest version
    STORE/versions/<N>.json         the manifest of each earlier version (`medseg dataset add`, `data/add.py`)
    STORE/sources/v<N>/             the raw files of the cases version N added (imagesTr/, labelsTr/)
    STORE/cases/<case_id>/          zarr3 group per case; its attributes are the case's manifest record (a case
                                    replaced by a corrected one in version N: the new one in `<case_id>@v<N>`, named
                                    by its record's "directory"; the old one stays for the versions that hold it):
        image       float32 (X, Y, Z, C) preprocessed, channels last
        label       uint8 (X, Y, Z) (int16 beyond 255 classes)
        locations   int32 (N, 3) foreground voxel coordinates sorted by class (for oversampling)

Arrays use the zarr3 `sharding_indexed` codec: one file per array, inner chunks of `plan["chunk_shape"]` voxels (all
channels together) compressed with zstd, so a random patch reads only the chunks it touches and a dataset of 1,000
cases is ~4,000 files, not millions. A case is written under `cases/.partial-<id>` and renamed into place when
complete: a case directory that exists is whole.

Caching is explicit: tensorstore's chunk cache is off by default (random patches rarely hit the same chunk twice and
the OS page cache already holds hot files), so reader memory does not grow with the store.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorstore as ts

from medseg_jax import fileio
from medseg_jax.errors import MedsegError
from medseg_jax.io import geometry as geometry_lib

FORMAT = 1
PARTIAL_PREFIX = ".partial-"
ZSTD_LEVEL = 3
LOCATIONS_CHUNK = 4096
MAX_OPEN_CASES = 64


def context(cache_bytes: int = 0, copy_threads: int | None = None) -> ts.Context:
    """The tensorstore context every reader and writer uses (explicit cache and thread limits)."""
    threads = copy_threads or max(1, min(os.cpu_count() or 1, 8))
    return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)},
                       "data_copy_concurrency": {"limit": threads},
                       "file_io_concurrency": {"limit": 32}})


def _group_json(attributes: dict) -> str:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2) + "\n"


def is_store(path: Path) -> bool:
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "medseg_store" in meta.get("attributes", {})


def create_root(path: Path) -> None:
    """Makes `path` an (empty) store: the root and cases/ groups."""
    path.mkdir(parents=True, exist_ok=True)
    fileio.write_text(path / "zarr.json", _group_json({"medseg_store": {"format": FORMAT}}))
    (path / "cases").mkdir(exist_ok=True)
    fileio.write_text(path / "cases" / "zarr.json", _group_json({}))


def _array_spec(path: Path, shape: Sequence[int], dtype: str, inner_chunk: Sequence[int]) -> dict:
    inner = [max(1, min(int(c), int(s))) for c, s in zip(inner_chunk, shape)]
    inner += [int(s) for s in shape[len(inner_chunk):]]
    shard = [max(1, -(-int(s) // c) * c) for s, c in zip(shape, inner)]  # whole array in one shard file
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [int(s) for s in shape],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": inner,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}],
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            }}],
        },
        "create": True,
        "delete_existing": True,
    }


def _write_array(path: Path, array: np.ndarray, inner_chunk: Sequence[int], ctx: ts.Context) -> None:
    spec = _array_spec(path, array.shape, np.dtype(array.dtype).name, inner_chunk)
    handle = ts.open(spec, context=ctx).result()
    handle.write(array).result()


def case_directory(meta: dict) -> str:
    """The folder under cases/ that holds a case (its id, unless a corrected version replaced it)."""
    return meta.get("directory", meta["case_id"])


def write_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray, locations: np.ndarray, meta: dict,
               chunk_shape: Sequence[int], ctx: ts.Context | None = None) -> None:
    """Writes one case under a temporary name and renames it into `cases/<case_directory(meta)>` (all or nothing)."""
    ctx = ctx or context()
    cases = Path(root) / "cases"
    final = cases / case_directory({"case_id": case_id, **meta})
    partial = cases / f"{PARTIAL_PREFIX}{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    chunk3 = [int(c) for c in chunk_shape]
    _write_array(partial / "image", np.ascontiguousarray(image, np.float32), chunk3 + [image.shape[-1]], ctx)
    _write_array(partial / "label", np.ascontiguousarray(label), chunk3, ctx)
    _write_array(partial / "locations", np.ascontiguousarray(locations, np.int32), [LOCATIONS_CHUNK, 3], ctx)
    (partial / "zarr.json").write_text(_group_json(meta))
    os.replace(partial, final)


def remove_partial_cases(root: Path) -> int:
    """Deletes half-written cases left by an interrupted prepare; returns how many."""
    cases = Path(root) / "cases"
    stale = [p for p in cases.glob(f"{PARTIAL_PREFIX}*") if p.is_dir()] if cases.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return len(stale)


def completed_cases(root: Path) -> set[str]:
    cases = Path(root) / "cases"
    if not cases.is_dir():
        return set()
    return {p.name for p in cases.iterdir() if p.is_dir() and not p.name.startswith(".") and
            (p / "zarr.json").is_file()}


def read_case_meta(root: Path, case_id: str) -> dict:
    return json.loads((Path(root) / "cases" / case_id / "zarr.json").read_text())["attributes"]


def version_path(root: Path, version: int) -> Path:
    return Path(root) / "versions" / f"{int(version)}.json"


class Store:
    """Read access to a prepared store: manifest, plan, whole cases and random patches.

    `version`: the store as it was at that version (`medseg dataset add` makes a new one each time it adds cases;
    earlier runs keep training on theirs); None or 0: the newest.

    Picklable (grain sends it to worker processes): open tensorstore handles are dropped and reopened lazily."""

    def __init__(self, root: str | os.PathLike, cache_bytes: int = 0, copy_threads: int | None = None,
                 version: int | None = None):
        self.root = Path(root)
        self.cache_bytes = cache_bytes
        self.copy_threads = copy_threads
        if not self.root.is_dir():
            raise MedsegError(f"{self.root}: store not found; make one with `medseg prepare --source DATASET "
                              f"--out {self.root}`")
        if not is_store(self.root):
            raise MedsegError(f"{self.root}: not a medseg store (no zarr.json with medseg_store attributes)")
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise MedsegError(f"{self.root}: preparation did not finish (no manifest.json); run `medseg prepare` "
                              "again with the same --source and --out to complete it")
        self.manifest = json.loads(manifest_path.read_text())
        newest = int(self.manifest.get("version", 1))
        if version and int(version) != newest:
            if not 1 <= int(version) < newest or not version_path(self.root, version).is_file():
                raise MedsegError(f"{self.root}: no version {version} (this store has versions 1 to {newest})")
            self.manifest = json.loads(version_path(self.root, version).read_text())
        self.version = int(self.manifest.get("version", 1))
        self.plan = json.loads((self.root / "plans.json").read_text())
        self.cases: dict[str, dict] = {c["case_id"]: c for c in self.manifest["cases"]}
        self.case_ids = sorted(self.cases)
        self._handles: OrderedDict = OrderedDict()
        self._ctx = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        state["_ctx"] = None
        return state

    @property
    def fingerprint(self) -> dict:
        return json.loads((self.root / "fingerprint.json").read_text())

    @property
    def labelled(self) -> bool:
        """False for a store of images only (`medseg prepare --unlabelled`: labels all zero, for pretraining)."""
        return bool(self.plan.get("labelled", True))

    @property
    def num_channels(self) -> int:
        return len(self.plan["normalization"])

    def _context(self) -> ts.Context:
        if self._ctx is None:
            self._ctx = context(self.cache_bytes, self.copy_threads)
        return self._ctx

    def arrays(self, case_id: str) -> dict:
        """{"image", "label", "locations"} tensorstore handles of a case (a bounded number stay open)."""
        if case_id in self._handles:
            self._handles.move_to_end(case_id)
            return self._handles[case_id]
        if case_id not in self.cases:
            raise MedsegError(f"{self.root}: no case '{case_id}' in the store")
        base = self.root / "cases" / case_directory(self.cases[case_id])
        futures = {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(base / name)}},
                                 context=self._context(), read=True, write=False)
                   for name in ("image", "label", "locations")}
        handles = {name: future.result() for name, future in futures.items()}
        self._handles[case_id] = handles
        while len(self._handles) > MAX_OPEN_CASES:
            self._handles.popitem(last=False)
        return handles

    def read_case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole preprocessed (image, label) of a case."""
        handles = self.arrays(case_id)
        image, label = handles["image"].read(), handles["label"].read()
        return image.result(), label.result()

    def location(self, case_id: str, value: int, index: int) -> np.ndarray:
        """The `index`-th stored voxel of class `value` (see `meta["class_locations"]`)."""
        offset, count = self.cases[case_id]["class_locations"][str(value)]
        if not 0 <= index < count:
            raise IndexError(index)
        return self.arrays(case_id)["locations"][offset + index].read().result()

    def read_patch(self, case_id: str, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The (image, label) box [start, start + size) of a case; outside the volume image and label are 0.

        Image and label are read concurrently."""
        handles = self.arrays(case_id)
        shape = self.cases[case_id]["shape"]
        src, dst = [], []
        for s, p, n in zip(start, size, shape):
            lo, hi = max(int(s), 0), min(int(s) + int(p), int(n))
            hi = max(hi, lo)
            src.append(slice(lo, hi))
            dst.append(slice(lo - int(s), hi - int(s)))
        image = np.zeros(tuple(size) + (self.num_channels,), np.float32)
        label = np.zeros(tuple(size), handles["label"].dtype.numpy_dtype)
        if all(s.stop > s.start for s in src):
            futures = [handles["image"][tuple(src)].read(), handles["label"][tuple(src)].read()]
            image[tuple(dst)] = futures[0].result()
            label[tuple(dst)] = futures[1].result()
        return image, label

    def source_path(self, relative: str | None) -> Path | None:
        """A source file recorded in the manifest (relative to the source dataset folder)."""
        if relative is None:
            return None
        path = Path(relative)
        return path if path.is_absolute() else Path(self.manifest.get("source_root", "")) / path

    def geometry(self, case_id: str) -> geometry_lib.Geometry:
        return geometry_lib.Geometry.from_dict(self.cases[case_id]["geometry"])

    def map_back(self, case_id: str, label: np.ndarray) -> np.ndarray:
        """A preprocessed-grid label map of a case -> the case's original canonical grid (nearest), through the
        manifest's crop box and shape (logits go back with `infer.postprocess.logits_to_original`).

        `nifti.write_label(path, result, store.geometry(case_id))` writes it in the source file's own geometry."""
        from medseg_jax.data import preprocess

        meta = self.cases[case_id]
        return preprocess.map_back(label, meta["crop_box"], meta["canonical_shape"], order=0)
