"""The grain patch loader: oversampling ratio, determinism, per-process shards, and iterator-state resume."""

from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medseg_jax.data import fingerprint as fp
from medseg_jax.data import loader
from medseg_jax.data.prepare import prepare
from medseg_jax.data.store import Store
from tests.conftest import write_tiny_dataset

PATCH = (12, 10, 8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    dataset = write_tiny_dataset(root / "ds", num_train=5, num_test=0)
    prepare(dataset, root / "store", fp.default_data_config())
    return Store(root / "store")


def batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])


@pytest.mark.parametrize("batch_size", [2, 3])
def test_measured_oversampling_matches_the_configured_ratio(store, batch_size):
    """Share of patches centred on foreground = p + (1 - p) * f, f the foreground share of a random voxel, for a batch
    size where nnU-Net's rounding rule would give 1/2 (batch 2) instead of 1/3; classes drawn evenly."""
    oversample, steps = 1 / 3, 900 // batch_size
    sampler = loader.PatchSampler(store, store.case_ids, PATCH, batch_size, oversample, seed=0)
    labels = {case_id: store.read_case(case_id)[1] for case_id in store.case_ids}
    f = np.mean([np.mean(label > 0) for label in labels.values()])
    centres, forced = [], []
    for step in range(steps):
        for index in range(batch_size):
            spec = sampler.spec(step, index)
            centres.append(int(labels[spec.case_id][spec.center]))
            forced.append(spec.foreground_class)
    forced_share = np.mean([c is not None for c in forced])
    assert forced_share == pytest.approx(oversample, abs=0.04)
    expected = oversample + (1 - oversample) * f
    assert np.mean(np.array(centres) > 0) == pytest.approx(expected, abs=0.05)
    classes = [c for c in forced if c is not None]
    assert np.mean(np.array(classes) == 1) == pytest.approx(0.5, abs=0.1)  # class 1 is 5x larger than class 2
    # The patches the pipeline yields are centred where the spec says.
    batch = next(iter(loader.make_dataset(sampler, 1, threads=0)))
    for index in range(batch_size):
        spec = sampler.spec(0, index)
        assert batch["label"][index][tuple(p // 2 for p in PATCH)] == labels[spec.case_id][spec.center]


def test_stream_is_a_pure_function_of_seed_and_step(store):
    def stream(seed, workers=0, threads=2):
        sampler = loader.PatchSampler(store, store.case_ids, PATCH, 2, 0.33, seed)
        return batches(iter(loader.make_dataset(sampler, 6, workers=workers, threads=threads)), 6)

    first = stream(0)
    assert_same(first, stream(0, threads=0))
    other = stream(1)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    assert first[0]["image"].shape == (2, *PATCH, 1) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].dtype == np.int32


def test_each_process_reads_only_its_share_of_the_global_batch(store):
    whole = loader.PatchSampler(store, store.case_ids, PATCH, 4, 0.33, 0)
    parts = [loader.PatchSampler(store, store.case_ids, PATCH, 4, 0.33, 0, range(2 * p, 2 * p + 2))
             for p in range(2)]
    full = batches(iter(loader.make_dataset(whole, 3, threads=0)), 3)
    shards = [batches(iter(loader.make_dataset(part, 3, threads=0)), 3) for part in parts]
    for step in range(3):
        joined = np.concatenate([shards[0][step]["image"], shards[1][step]["image"]])
        assert np.array_equal(joined, full[step]["image"])


def test_stream_started_at_a_step_equals_the_rest_of_the_whole_stream(store):
    """How a run resumed on another process count continues: no loader state, the stream starts at the step."""
    sampler = loader.PatchSampler(store, store.case_ids, PATCH, 2, 0.33, 0)
    full = batches(iter(loader.make_dataset(sampler, 5, threads=0)), 5)
    tail = batches(iter(loader.make_dataset(sampler, 5, threads=0, start_step=3)), 2)
    for a, b in zip(full[3:], tail):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_restored_from_orbax_gives_the_same_batches(store, tmp_path, workers):
    import grain

    def fresh():
        sampler = loader.PatchSampler(store, store.case_ids, PATCH, 2, 0.33, seed=3)
        return iter(loader.make_dataset(sampler, 10, workers=workers, threads=1))

    straight = fresh()
    expected = batches(straight, 7)
    if hasattr(straight, "close"):
        straight.close()

    interrupted = fresh()
    batches(interrupted, 4)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(interrupted)))
    manager.wait_until_finished()
    if hasattr(interrupted, "close"):
        interrupted.close()

    resumed = fresh()
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same(batches(resumed, 3), expected[4:])
    if hasattr(resumed, "close"):
        resumed.close()


def test_bad_oversample_is_a_config_error(store):
    from medseg_jax.errors import MedsegError

    with pytest.raises(MedsegError, match="data.oversample_foreground"):
        loader.PatchSampler(store, store.case_ids, PATCH, 2, 1.5, 0)
