"""The store a run trains from: the one named by `data.store`, or `RUN/store` prepared from `data.dataset`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections

from medseg_jax.data.prepare import data_config_record, prepare
from medseg_jax.data.store import Store
from medseg_jax.errors import MedsegError

log = logging.getLogger(__name__)


def open_training_store(data_config: ml_collections.ConfigDict, workdir: str | Path,
                        version: int | None = None) -> Store:
    """The prepared store named by `data.store` at `version` (default `data.store_version`; 0 the newest); or, with
    only `data.dataset` set, `WORKDIR/store` prepared from it (resuming an interrupted preparation). Refuses a store
    prepared with another data config."""
    if version is None:
        version = int(data_config.get("store_version", 0) or 0)
    if data_config.store:
        store = Store(data_config.store, version=version)
    elif data_config.dataset:
        path = Path(workdir) / "store"
        if jax.process_index() == 0:  # one process prepares; the others wait for it and read the result
            if not (path / "manifest.json").is_file():
                log.info("preparing %s into %s", data_config.dataset, path)
            prepare(data_config.dataset, path, data_config, workers=max(1, int(data_config.prepare_workers)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("medseg: store prepared")
        store = Store(path, version=version)
    else:
        raise MedsegError("config keys 'data.store' and 'data.dataset' are both empty: pass "
                          "--config.data.store=STORE (made by `medseg prepare`) or --config.data.dataset=DIR (a "
                          "dataset folder in Decathlon or nnU-Net layout, e.g. made by `medseg demo-data`)")
    prepared = json.loads((store.root / "prepare.json").read_text())["data_config"]
    wanted = data_config_record(data_config)
    differing = [k for k in wanted if wanted[k] != prepared.get(k)]
    if differing:
        key = differing[0]
        raise MedsegError(f"config key 'data.{key}': {wanted[key]!r} but store {store.root} was prepared with "
                          f"{prepared.get(key)!r}; set --config.data.{key} to match or prepare a new store")
    return store
