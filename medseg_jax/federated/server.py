"""The server of a federated run: Flower's strategies aggregate; the global model is an ordinary run directory.

    DIR/config.json, plans.json        the experiment (train.steps = rounds x local steps) and the sites' common plan
    DIR/federated.json                 sites, rounds, local steps, strategy, privacy settings (a resume must match)
    DIR/checkpoints/latest/<R*S>       the global params after round R, with the strategy's own state (FedAdam's
                                       moments); `medseg predict` / `evaluate` read it like any run
    DIR/checkpoints/best/              the round with the best mean validation Dice over the sites
    DIR/metrics.jsonl                  per round: mean local loss and every site's loss; validation Dice per site
    DIR/training_curve.png, federated_curve.png (validation Dice per site and round)

The rounds are Flower's (`Strategy.configure_train` / `aggregate_train` / `configure_evaluate` /
`aggregate_evaluate` over a `Grid`), driven here rather than by `Strategy.start` so that a killed run resumes at
its next round with the strategy's state and round number (FedAdam's bias correction depends on it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ml_collections
import numpy as np

from medseg_jax import fileio, runs, viz
from medseg_jax.errors import MedsegError
from medseg_jax.federated.site import flatten, nest
from medseg_jax.parallel import mesh as mesh_lib
from medseg_jax.train.experiment import apply_dataset_regions, build_experiment, run_keys
from medseg_jax.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def make_strategy(name: str, num_sites: int, *, proximal_mu: float = 0.01, server_lr: float = 0.01,
                  dp_clip: float = 0.0, dp_noise: float = 0.0):
    """Flower's strategy `name` over all `num_sites` sites every round, wrapped in client-side fixed clipping with
    Gaussian noise (Flower's DifferentialPrivacyClientSideFixedClipping; the sites clip with `fixedclipping_mod`) when
    `dp_clip` > 0."""
    from flwr.serverapp import strategy as flwr_strategy

    every_site = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=num_sites,
                      min_evaluate_nodes=num_sites, min_available_nodes=num_sites)
    if name == "fedavg":
        strategy = flwr_strategy.FedAvg(**every_site)
    elif name == "fedprox":
        strategy = flwr_strategy.FedProx(**every_site, proximal_mu=proximal_mu)
    elif name == "fedadam":
        strategy = flwr_strategy.FedAdam(**every_site, eta=server_lr)
    else:
        raise MedsegError(f"--strategy {name}: not one of {', '.join(STRATEGIES)}")
    if dp_clip:
        strategy = flwr_strategy.DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=dp_noise, clipping_norm=dp_clip, num_sampled_clients=num_sites)
    return strategy


def _optimizer_of(strategy):
    """The FedOpt strategy (FedAdam) inside `strategy` (or None): its moments are state a resume must restore."""
    inner = getattr(strategy, "strategy", strategy)
    return inner if hasattr(inner, "m_t") else None


def strategy_state(strategy) -> dict:
    inner = _optimizer_of(strategy)
    if inner is None or inner.m_t is None:
        return {}
    return {"m_t": dict(inner.m_t), "v_t": dict(inner.v_t or {})}


def restore_strategy_state(strategy, state: dict) -> None:
    inner = _optimizer_of(strategy)
    if inner is not None and state.get("m_t"):
        inner.m_t = {k: np.asarray(v) for k, v in state["m_t"].items()}
        inner.v_t = {k: np.asarray(v) for k, v in state["v_t"].items()}


class GlobalRun:
    """The server's run directory (see the module docstring)."""

    def __init__(self, workdir: str | Path, config: ml_collections.ConfigDict, plan: dict, settings: dict):
        self.run = runs.RunDir(workdir)
        self.config, self.plan, self.settings = apply_dataset_regions(config, plan), plan, settings
        self.local_steps = int(settings["local_steps"])
        self.run.path.mkdir(parents=True, exist_ok=True)
        record = self.run.path / "federated.json"
        self.resumed_round = 0
        if record.is_file():
            import json

            saved = json.loads(record.read_text())
            differing = [k for k in settings if saved.get(k) != settings[k]]
            if differing:
                raise MedsegError(f"{self.run.path}: a federated run with other settings ({differing[0]}: "
                                  f"{saved.get(differing[0])!r}, now {settings[differing[0]]!r}); choose another "
                                  "--workdir or run the same command again to resume")
        else:
            fileio.write_json(record, settings)
            self.run.save_config(config)
            self.run.save_plans(plan)
        self.latest, self.best = self.run.checkpoint_managers(writer=True)
        step = self.latest.latest_step()
        if step is not None:
            self.resumed_round = step // self.local_steps
        self.metrics = MetricsLog(self.run, keep_until_step=self.resumed_round * self.local_steps)

    def initial_params(self) -> dict[str, np.ndarray]:
        """The params round 1 starts from: the experiment's initialisation with its seed, as ordinary training's."""
        layout = mesh_lib.make_mesh_layout(None, spatial_dims=len(self.config.train.patch_size))
        experiment = build_experiment(self.config, len(self.plan["labels"]), len(self.plan["normalization"]), layout)
        return flatten(experiment.init_state(run_keys(self.config.seed)[0]).params)

    def restore(self, strategy) -> dict[str, np.ndarray]:
        """The global params after the last saved round (its strategy state restored into `strategy`)."""
        step = self.latest.latest_step()
        saved = runs.restore_raw(self.latest, step)
        restore_strategy_state(strategy, {k: flatten(v) for k, v in saved.get("strategy", {}).items()})
        return flatten(saved["params"])

    def save_round(self, server_round: int, params: dict[str, np.ndarray], strategy, mean_dice: float | None):
        step = server_round * self.local_steps
        # nested as a trained run's params (prediction loads them so); the strategy's state beside them
        state = {"params": nest(params), "round": np.int32(server_round)}
        moments = strategy_state(strategy)
        if moments:
            state["strategy"] = {k: nest(v) for k, v in moments.items()}
        runs.save_checkpoint(self.latest, step, state, force=True)
        if mean_dice is not None:
            runs.save_checkpoint(self.best, step, state, metrics={"val_dice": mean_dice})
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def finish(self, summary: dict) -> None:
        records = self.run.read_metrics()
        viz.training_curve_png(records, self.run.curve_path)
        viz.site_curves_png(records, self.run.path / "federated_curve.png")
        fileio.write_json(self.run.summary_path, summary)
        self.metrics.close()


def _reply_metrics(replies) -> list[tuple[str, dict]]:
    """(site name, metrics) of every reply that carries content; errors raise, naming the site's message."""
    out = []
    for reply in replies:
        if reply.has_error():
            raise MedsegError(f"federated: a site failed: {reply.error.reason}")
        metrics = dict(next(iter(reply.content.metric_records.values())))
        names = list(reply.content.config_records.values())
        site = str(names[0]["site"]) if names and "site" in names[0] else str(reply.metadata.src_node_id)
        out.append((site, metrics))
    return sorted(out)


def run_rounds(grid, strategy, global_run: GlobalRun, rounds: int, timeout: float = 24 * 3600) -> dict:
    """Rounds `global_run.resumed_round + 1` .. `rounds` over `grid`: the sites train, Flower's strategy aggregates,
    the sites validate the new global params; each round is saved before the next begins."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    started = time.time()
    local_steps = global_run.local_steps
    if global_run.resumed_round:
        params = global_run.restore(strategy)
        log.info("resuming after round %d of %d", global_run.resumed_round, rounds)
    else:
        params = global_run.initial_params()
    arrays = ArrayRecord({k: Array(v) for k, v in params.items()})
    best = None
    for server_round in range(global_run.resumed_round + 1, rounds + 1):
        config = ConfigRecord({"local-steps": local_steps})
        replies = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid),
                                             timeout=timeout))
        site_train = _reply_metrics(replies)
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise MedsegError(f"federated round {server_round}: no site update could be aggregated")
        arrays = new_arrays
        params = {k: v.numpy() for k, v in arrays.items()}
        replies = list(grid.send_and_receive(strategy.configure_evaluate(server_round, arrays, ConfigRecord(),
                                                                         grid), timeout=timeout))
        site_val = [(site, m) for site, m in _reply_metrics(replies) if m.get("num-examples")]
        step = server_round * local_steps
        loss = float(np.average([m["loss"] for _, m in site_train], weights=[m["num-examples"] for _, m in site_train]))
        global_run.metrics.write({"kind": "train", "step": step, "round": server_round, "loss": loss,
                                  **{f"loss_{site}": m["loss"] for site, m in site_train}})
        mean_dice = None
        if site_val:
            mean_dice = float(np.average([m["val_dice"] for _, m in site_val],
                                         weights=[m["num-examples"] for _, m in site_val]))
            global_run.metrics.write({"kind": "val", "step": step, "round": server_round, "val_dice": mean_dice,
                                      **{f"val_dice_{site}": m["val_dice"] for site, m in site_val}})
            best = mean_dice if best is None else max(best, mean_dice)
        global_run.save_round(server_round, params, strategy, mean_dice)
        log.info("round %d of %d: loss %.4f, validation Dice %s", server_round, rounds, loss,
                 "n/a" if mean_dice is None else f"{mean_dice:.4f}")
    summary = {"rounds": rounds, "local_steps": local_steps, "steps": rounds * local_steps,
               "resumed_after_round": global_run.resumed_round, "wall_seconds": round(time.time() - started, 1),
               "best_val_dice": best, "best_step": global_run.best.best_step(), "task": "federated"}
    global_run.finish(summary)
    return summary
