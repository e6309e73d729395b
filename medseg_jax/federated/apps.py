"""Flower's ClientApp and ServerApp for medseg, and `federate` (`medseg federated`): Flower's simulation runtime on
one machine.

The same two apps run on separate machines under Flower's Deployment Engine: `client_app` (or `client_app_dp` with
differential privacy) on every site's SuperNode, which names its site, store and local folder in its node config
(`--node-config "site='A' store='/data/store' workdir='/data/medseg_site'"`), and `server_app` through the SuperLink,
configured by the run config (`experiment`, `plans`, `workdir`, `rounds`, `local-steps`, `strategy`, ...: see
`deployment_settings`). In simulation both are built here around the command's settings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import ml_collections

from medseg_jax import config as config_lib
from medseg_jax import fileio
from medseg_jax.errors import MedsegError
from medseg_jax.federated.server import STRATEGIES, GlobalRun, make_strategy, run_rounds
from medseg_jax.federated.site import Site, site_config

# Sites this process serves, built once: a simulation actor serves several sites in turn, and compiling the step
# once per site and process is what keeps rounds cheap. Their state is also on disk (site.py).
_SITES: dict[tuple[str, str, str], Site] = {}


def _site(context, settings: dict | None) -> Site:
    """The site this ClientApp call is for: by the simulated node's partition id, or by the SuperNode's config."""
    node = dict(context.node_config)
    simulated = settings is not None and "partition-id" in node
    if simulated:
        name, store, workdir = settings["sites"][int(node["partition-id"])]
    else:
        missing = [k for k in ("store", "workdir") if k not in node]
        if missing:
            raise MedsegError(f"SuperNode node config lacks {missing[0]!r} (give --node-config \"site='A' "
                              "store='/data/store' workdir='/data/medseg_site'\")")
        # The site's local state lives in a folder of its own per global run (named after the server's run
        # directory, so a resumed run finds it and two runs never share it).
        global_run = str(dict(context.run_config).get("workdir", ""))
        workdir = Path(node["workdir"]) / f"run-{hashlib.sha1(global_run.encode()).hexdigest()[:12]}"
        name, store = str(node.get("site", context.node_id)), node["store"]
        import jax

        # A SuperNode starts a new ClientApp process for every message: without a persistent compilation cache
        # every round would compile the site's step again (shared by the site's runs).
        jax.config.update("jax_compilation_cache_dir", str(Path(node["workdir"]).absolute() / "jax_cache"))
    key = (name, str(store), str(workdir))
    if key not in _SITES:  # (the experiment is read and the step built once per site and process)
        if simulated:
            config = ml_collections.ConfigDict(settings["config"])
            rounds, local_steps = settings["rounds"], settings["local_steps"]
        else:
            run = dict(context.run_config)
            config = deployment_experiment(run)
            rounds, local_steps = int(run["rounds"]), int(run["local-steps"])
        _SITES[key] = Site(name, site_config(config, store, rounds, local_steps), workdir)
    return _SITES[key]


def make_client_app(settings: dict | None = None, dp: bool = False):
    """A Flower ClientApp: train = the site's local steps from the global params; evaluate = its validation Dice.
    With `dp`, Flower's `fixedclipping_mod` clips each update (its difference from the global params) to the server's
    clipping norm before it leaves the site."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    app = ClientApp(mods=[fixedclipping_mod] if dp else [])

    def reply(msg, site: Site, metrics: dict, arrays: dict | None = None):
        content = {"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": site.name})}
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return Message(content=RecordDict(content), reply_to=msg)

    @app.train()
    def train(msg, context):
        site = _site(context, settings)
        config = msg.content["config"]
        flat = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        params, metrics = site.train_round(int(config["server-round"]), flat, int(config["local-steps"]),
                                           float(config.get("proximal-mu", 0.0)))
        return reply(msg, site, metrics, params)

    @app.evaluate()
    def evaluate(msg, context):
        site = _site(context, settings)
        result = site.evaluate({k: v.numpy() for k, v in msg.content["arrays"].items()})
        return reply(msg, site, {"val_dice": result.get("val_dice", float("nan")),
                                 "num-examples": result["num-examples"]})

    return app


def make_server_app(settings: dict, workdir: str | Path, outcome: dict):
    """A Flower ServerApp running `run_rounds` with the command's strategy; the summary (or the error) goes into
    `outcome`, since the simulation runs the server in a thread of its own."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        try:
            outcome["summary"] = serve(grid, settings, workdir)
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    return app


def serve(grid, settings: dict, workdir: str | Path) -> dict:
    """The server's whole run over `grid` (the rounds of server.py with the settings' strategy)."""
    strategy = make_strategy(settings["strategy"], len(settings["sites"]), proximal_mu=settings["proximal_mu"],
                             server_lr=settings["server_lr"], dp_clip=settings["dp_clip"],
                             dp_noise=settings["dp_noise"])
    global_run = GlobalRun(workdir, ml_collections.ConfigDict(settings["config"]), settings["plan"],
                           _recorded(settings))
    return run_rounds(grid, strategy, global_run, settings["rounds"])


def _recorded(settings: dict) -> dict:
    """What federated.json records (and a resume must repeat)."""
    return {"sites": [[name, str(store)] for name, store, _ in settings["sites"]], "rounds": settings["rounds"],
            "local_steps": settings["local_steps"], "strategy": settings["strategy"],
            "proximal_mu": settings["proximal_mu"], "server_lr": settings["server_lr"],
            "dp_clip": settings["dp_clip"], "dp_noise": settings["dp_noise"], "config": settings["config"]}


def parse_sites(text: str) -> list[tuple[str, str]]:
    """"A=STORE_A,B=STORE_B" -> [("A", "STORE_A"), ("B", "STORE_B")]."""
    sites = []
    for item in [part.strip() for part in (text or "").split(",") if part.strip()]:
        name, sep, store = item.partition("=")
        if not sep or not name or not store:
            raise MedsegError(f"--sites {text}: expected NAME=STORE,NAME=STORE (e.g. A=stores/a,B=stores/b)")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise MedsegError(f"--sites: site name {name!r}: use letters, digits, _ and - (it names a folder)")
        sites.append((name, store))
    if not sites:
        raise MedsegError("--sites: name at least one site, e.g. --sites A=stores/a,B=stores/b")
    if len({name for name, _ in sites}) != len(sites):
        raise MedsegError(f"--sites {text}: a site name is given twice")
    return sites


def common_plan(sites: list[tuple[str, str]]) -> dict:
    """The preprocessing plan every site's store was prepared with; sites planned differently are refused (the global
    model must see every site's images the same way: prepare them with `medseg prepare --plan-from` one plan)."""
    from medseg_jax.data.store import Store

    plans = {name: Store(store).plan for name, store in sites}
    first_name, first = next(iter(plans.items()))
    for name, plan in plans.items():
        if not plan.get("labelled", True):
            raise MedsegError(f"--sites {name}={dict(sites)[name]}: this store holds no labels (--unlabelled)")
        differing = [k for k in first if plan.get(k) != first[k]]
        if differing:
            raise MedsegError(f"--sites {name}: its store's plan differs from site {first_name}'s in "
                              f"'{differing[0]}'; prepare every site with `medseg prepare --plan-from` one store")
    return first


def global_config(config: ml_collections.ConfigDict, rounds: int, local_steps: int) -> ml_collections.ConfigDict:
    """The experiment as the global run records it: segmentation, its schedule over rounds x local steps."""
    config = ml_collections.ConfigDict(config.to_dict())
    with config.unlocked():
        config.task = "segment"
        config.train.steps = int(rounds) * int(local_steps)
    return config


def federate(config: ml_collections.ConfigDict, sites: list[tuple[str, str]], workdir: str | Path, *, rounds: int,
             local_steps: int, strategy: str = "fedavg", proximal_mu: float = 0.01, server_lr: float = 0.01,
             dp_clip: float = 0.0, dp_noise: float = 0.0, num_gpus_per_site: float = 0.0) -> dict:
    """Federated training of `config` over `sites` in Flower's simulation runtime (one process per site at a time,
    each with all the CPU cores); returns the summary. Site s keeps its local state in WORKDIR/sites/<s>."""
    from flwr.simulation import run_simulation

    from medseg_jax.experiments import schema

    if rounds < 1 or local_steps < 1:
        raise MedsegError(f"--rounds {rounds} --local-steps {local_steps}: both must be at least 1")
    if strategy not in STRATEGIES:
        raise MedsegError(f"--strategy {strategy}: not one of {', '.join(STRATEGIES)}")
    if dp_clip < 0 or dp_noise < 0 or (dp_noise and not dp_clip):
        raise MedsegError("--dp-clip C --dp-noise Z: C > 0 (the clipping norm of each site's update) and Z >= 0")
    config = global_config(config, rounds, local_steps)
    schema.check(config)
    plan = common_plan(sites)
    workdir = Path(workdir)
    settings = {"sites": [(name, store, str(workdir / "sites" / name)) for name, store in sites],
                "config": config_lib.to_plain(config), "plan": plan, "rounds": int(rounds),
                "local_steps": int(local_steps), "strategy": strategy, "proximal_mu": float(proximal_mu),
                "server_lr": float(server_lr), "dp_clip": float(dp_clip), "dp_noise": float(dp_noise)}
    outcome: dict = {}
    cores = os.cpu_count() or 1
    backend_config = {"client_resources": {"num_cpus": cores, "num_gpus": num_gpus_per_site},
                      "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": True}}
    with fileio.exclusive(workdir, "trained by medseg federated"):  # (before Flower starts anything)
        run_simulation(server_app=make_server_app(settings, workdir, outcome),
                       client_app=make_client_app(settings, dp=bool(dp_clip)), num_supernodes=len(sites),
                       backend_config=backend_config)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise MedsegError("federated: Flower's simulation ended before the server finished (see the log above)")
    return outcome["summary"]


def deployment_experiment(run: dict) -> ml_collections.ConfigDict:
    """The experiment a Deployment Engine run config names (`experiment`, with its `config-overrides`), read the same
    way by the server and by every site."""
    for key in ("experiment", "rounds", "local-steps"):
        if not str(run.get(key, "")).strip():
            raise MedsegError(f"Flower run config lacks {key!r} (flwr run ... --run-config \"{key}=...\")")
    return config_lib.load_config(run["experiment"], str(run.get("config-overrides", "")).split())


def deployment_settings(context) -> dict:
    """The ServerApp's settings from a Deployment Engine run config (`flwr run ... --run-config`)."""
    import json

    run = dict(context.run_config)
    for key in ("plans", "workdir"):
        if not str(run.get(key, "")).strip():
            raise MedsegError(f"Flower run config lacks {key!r} (flwr run ... --run-config \"{key}=...\")")
    rounds, local_steps = int(run["rounds"]), int(run["local-steps"])
    config = global_config(deployment_experiment(run), rounds, local_steps)
    sites = [(name, "", "") for name in str(run.get("sites", "")).split(",") if name] or [("site", "", "")]
    return {"sites": sites, "config": config_lib.to_plain(config),
            "plan": json.loads(Path(run["plans"]).read_text()), "rounds": rounds, "local_steps": local_steps,
            "strategy": str(run.get("strategy", "fedavg")), "proximal_mu": float(run.get("proximal-mu", 0.01)),
            "server_lr": float(run.get("server-lr", 0.01)), "dp_clip": float(run.get("dp-clip", 0.0)),
            "dp_noise": float(run.get("dp-noise", 0.0)), "workdir": str(run["workdir"])}


def _deployment_apps():
    """`server_app`, `client_app`, `client_app_dp` for the Deployment Engine (built when flwr is installed)."""
    try:
        from flwr.serverapp import ServerApp
    except ImportError:  # the federated extra is not installed: nothing to deploy
        return None, None, None
    server = ServerApp()

    @server.main()
    def main(grid, context):
        settings = deployment_settings(context)
        with fileio.exclusive(settings["workdir"], "trained by a federated ServerApp"):
            serve(grid, settings, settings["workdir"])

    return server, make_client_app(), make_client_app(dp=True)


# One name per assignment: Flower checks a Flower App's components by reading this module's source, not importing it.
_DEPLOYMENT_APPS = _deployment_apps()
server_app = _DEPLOYMENT_APPS[0]
client_app = _DEPLOYMENT_APPS[1]
client_app_dp = _DEPLOYMENT_APPS[2]
