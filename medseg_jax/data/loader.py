"""Streaming random training patches from a prepared store with grain.

The sample stream is a pure function of (seed, step, sample index in the global batch), as in nnU-Net's loader:

- the case is drawn uniformly;
- foreground oversampling: the batch of step s has n_fg(s) = floor(B * p + u_s) foreground samples (u_s uniform in
  [0, 1) from (seed, s)), its last n_fg(s) samples. The expected share is exactly p for any batch size (nnU-Net's
  round(B * (1 - p)) threshold gives 1/2 instead of 1/3 at batch size 2). A foreground sample is centred on a stored
  voxel of a class drawn evenly among the classes present in the case, so small structures are seen as often as
  large ones; the other samples are centred on a uniformly random voxel;
- the patch is read from the store (image and label concurrently, tensorstore); outside the volume it is 0.

The grain pipeline `MapDataset.range -> map(sample) -> to_iter_dataset (threads) -> [mp_prefetch (processes)] ->
batch` yields each process's share of every global batch (the rows its devices hold on the mesh, e.g. process i of P
reads samples i*B/P ... (i+1)*B/P - 1 when the batch is split over processes), with bounded prefetch buffers. Its
iterator state is checkpointed with orbax (grain's CheckpointSave/CheckpointRestore) so a resumed run sees the same
stream; a run resumed on another process count restarts the stream at the checkpoint's step instead, which gives the
same samples. `device_batches` puts each batch on the mesh, each local device receiving its slice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grain
import numpy as np

from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError


def num_foreground(step: int, batch_size: int, oversample: float, seed: int) -> int:
    """How many samples of step `step`'s global batch are centred on foreground (expected: batch_size * oversample)."""
    if not 0.0 <= oversample <= 1.0:
        raise MedsegError(f"config key 'data.oversample_foreground': {oversample} must be within [0, 1]")
    u = np.random.default_rng([seed, step, 1 << 30]).random()
    return min(batch_size, int(np.floor(batch_size * oversample + u)))


@dataclass(frozen=True)
class SampleSpec:
    case_id: str
    center: tuple[int, int, int]
    foreground_class: int | None  # the class the patch is centred on, None for a random patch


class PatchSampler:
    """`sampler(element)` -> {"image": (*patch, C) float32, "label": (*patch) int32} for element = step * L + j, where
    j indexes this process's `local_indices` (the rows of the global batch its devices hold)."""

    def __init__(self, store: Store, case_ids: Sequence[str], patch_size: Sequence[int], batch_size: int,
                 oversample: float, seed: int, local_indices: Sequence[int] | None = None):
        if not case_ids:
            raise MedsegError(f"{store.root}: no training cases to sample from")
        self.store = store
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.oversample = float(oversample)
        self.seed = int(seed)
        self.local_indices = list(range(batch_size) if local_indices is None else local_indices)
        num_foreground(0, batch_size, oversample, seed)  # validates oversample
        # The foreground classes present in each case, computed once rather than per sample.
        self.present = {case_id: sorted(int(c) for c, (_, n) in store.cases[case_id]["class_locations"].items()
                                        if n > 0) for case_id in self.case_ids}

    def spec(self, step: int, index: int) -> SampleSpec:
        rng = np.random.default_rng([self.seed, step, index])
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        meta = self.store.cases[case_id]
        present = self.present[case_id]
        is_foreground = index >= self.batch_size - num_foreground(step, self.batch_size, self.oversample, self.seed)
        if is_foreground and present:
            value = present[int(rng.integers(len(present)))]
            count = meta["class_locations"][str(value)][1]
            center = self.store.location(case_id, value, int(rng.integers(count)))
            return SampleSpec(case_id, tuple(int(c) for c in center), value)
        return SampleSpec(case_id, tuple(int(rng.integers(s)) for s in meta["shape"]), None)

    def sample(self, step: int, index: int) -> dict:
        spec = self.spec(step, index)
        # A 2D patch is one slice (X, Y) of the stored volume, at the centre's z: 2D pictures are stored with z = 1,
        # and a volume trains slice by slice (nnU-Net's 2d configuration).
        size = self.patch_size if len(self.patch_size) == 3 else (*self.patch_size, 1)
        start = [c - p // 2 for c, p in zip(spec.center, size)]
        image, label = self.store.read_patch(spec.case_id, start, size)
        if len(self.patch_size) == 2:
            image, label = image[:, :, 0], label[:, :, 0]
        return {"image": image, "label": label.astype(np.int32)}

    def __call__(self, element: int) -> dict:
        step, j = divmod(int(element), len(self.local_indices))
        return self.sample(step, self.local_indices[j])


def _stack(samples: Sequence[dict]) -> dict:
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags; outside an absl app they are unparsed (defaults are what we want)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(sampler: PatchSampler, num_steps: int, *, workers: int = 0, threads: int = 2,
                 prefetch_batches: int = 2, start_step: int = 0) -> grain.IterDataset:
    """The grain pipeline over steps [start_step, num_steps): one element per step (this process's samples stacked).

    `workers` > 0 reads in that many processes (grain mp_prefetch, spawned); `threads` per process overlap the
    tensorstore reads; buffers hold about `prefetch_batches` batches per process so memory stays bounded."""
    per = len(sampler.local_indices)
    if workers < 0 or threads < 0:
        raise MedsegError("config keys 'data.workers' and 'data.threads' must be >= 0")
    dataset = grain.MapDataset.range(start_step * per, num_steps * per).map(sampler)
    buffer = max(1, prefetch_batches * per)
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer))
    if workers > 0:
        _parse_absl_flags()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, prefetch_batches * per // workers)))
    return iter_dataset.batch(per, drop_remainder=True, batch_fn=_stack)


def device_batches(iterator: Iterator[dict], shardings: dict, shapes: dict, rows: Sequence[int]) -> Iterator[dict]:
    """Host batches -> global jax.Arrays of `shapes` on the mesh: this process holds batch rows `rows` and places
    each local device's slice of them (a sample split over the spatial mesh axes included)."""
    from medseg_jax.parallel.mesh import from_local_rows

    for batch in iterator:
        yield {k: from_local_rows(rows, v, shardings[k], shapes[k]) for k, v in batch.items()}
