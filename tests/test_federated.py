"""Federated training with Flower: sites train on their own stores, Flower's strategies aggregate.

The rounds' logic is tested in-process over a tiny grid that hands Flower's messages to the ClientApp directly (what
the simulation runtime does through Ray, minus the processes); one test goes through Flower's simulation runtime."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_OVERRIDES, built_once, tiny_config, write_tiny_dataset

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402

from medseg_jax import cli, runs  # noqa: E402
from medseg_jax import config as config_lib
from medseg_jax.errors import MedsegError  # noqa: E402
from medseg_jax.federated import apps  # noqa: E402
from medseg_jax.federated.server import GlobalRun, make_strategy, run_rounds  # noqa: E402
from medseg_jax.train.loop import train  # noqa: E402

ROUNDS, LOCAL_STEPS = 2, 2


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the run and node of the process; the runtimes set them, the tests here."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


class LocalGrid:
    """Flower's Grid for the tests: every message goes straight to the ClientApp of its node, in this process."""

    def __init__(self, client_app, num_nodes: int, fail_in_round: int | None = None):
        self.client_app, self.nodes = client_app, list(range(1, num_nodes + 1))
        self.fail_in_round = fail_in_round  # raise when this round's evaluation is asked for (a kill mid-run)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            config = message.content.config_records.get("config", {})
            if message.metadata.message_type.startswith("evaluate") and \
                    config.get("server-round") == self.fail_in_round:
                raise KeyboardInterrupt("killed")
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": node - 1}, state=RecordDict(),
                              run_config={})
            replies.append(self.client_app(message, context))
        return replies


def _settings(config, sites, workdir, strategy="fedavg", dp_clip=0.0, rounds=ROUNDS):
    config = config_lib.apply_overrides(config, [f"--config.train.steps={rounds * LOCAL_STEPS}"])
    return {"sites": [(name, store, str(workdir / "sites" / name)) for name, store in sites],
            "config": config_lib.to_plain(config), "plan": apps.common_plan(sites), "rounds": rounds,
            "local_steps": LOCAL_STEPS, "strategy": strategy, "proximal_mu": 0.01, "server_lr": 0.01,
            "dp_clip": dp_clip, "dp_noise": 0.0}


def _run_local(settings, workdir, fail_in_round=None):
    client = apps.make_client_app(settings, dp=bool(settings["dp_clip"]))
    grid = LocalGrid(client, len(settings["sites"]), fail_in_round)
    strategy = make_strategy(settings["strategy"], len(settings["sites"]), dp_clip=settings["dp_clip"])
    global_run = GlobalRun(workdir, config_lib.from_plain(settings["config"]), settings["plan"],
                           apps._recorded(settings))
    return run_rounds(grid, strategy, global_run, settings["rounds"])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two sites' stores with one plan (site B prepared with --plan-from A), 4 cases each."""
    def build(root):
        store_args = ["--config", str(REPO / "experiments" / "demo_ct.py"), "--config.data.target_spacing=(2,2,3)"]
        write_tiny_dataset(root / "a", num_train=4, num_test=0)
        assert cli.main(["prepare", "--source", str(root / "a"), "--out", str(root / "A"), *store_args]) == 0
        write_tiny_dataset(root / "b", num_train=4, num_test=0)  # (the same phantoms: the sites differ in name)
        assert cli.main(["prepare", "--source", str(root / "b"), "--out", str(root / "B"), "--plan-from",
                         str(root / "A")]) == 0

    root = built_once(tmp_path_factory, "federated_stores", build)
    return [("A", str(root / "A")), ("B", str(root / "B"))]


def _tiny(store):
    config = tiny_config(steps=ROUNDS * LOCAL_STEPS)
    with config.unlocked():
        config.data.store, config.data.dataset = store, ""
    return config


def _global_params(workdir) -> dict:
    return runs.load_params(workdir, checkpoint="latest")


def test_fedavg_over_one_site_equals_ordinary_training(stores, tmp_path):
    """One site, S local steps per round, R rounds of FedAvg = S x R steps of ordinary training."""
    name, store = stores[0]
    config = _tiny(store)
    _run_local(_settings(config, [stores[0]], tmp_path / "fed"), tmp_path / "fed")
    train(config, tmp_path / "plain")
    federated, plain = _global_params(tmp_path / "fed"), runs.load_params(tmp_path / "plain", checkpoint="latest")
    leaves = list(zip(jax.tree.leaves(federated), jax.tree.leaves(plain)))
    assert len(leaves) == len(jax.tree.leaves(plain)) > 10
    for fed, ordinary in leaves:
        np.testing.assert_allclose(fed, ordinary, rtol=1e-5, atol=1e-6)
    # and the step count really moved the params
    initial = apps.GlobalRun(tmp_path / "fed", config, apps.common_plan([stores[0]]),
                             apps._recorded(_settings(config, [stores[0]], tmp_path / "fed"))).initial_params()
    assert not np.allclose(jax.tree.leaves(plain)[0], next(iter(initial.values())))


def test_dp_clipping_bounds_each_sites_update(stores, tmp_path):
    """Flower's fixedclipping_mod on the site: the update it sends differs from the global params by at most the
    clipping norm (and without clipping it would differ by more, so the bound is not trivially met)."""
    settings = _settings(_tiny(stores[0][1]), stores[:1], tmp_path / "fed", dp_clip=1e-3)
    global_params = GlobalRun(tmp_path / "fed", config_lib.from_plain(settings["config"]), settings["plan"],
                              apps._recorded(settings)).initial_params()

    def update_norm(dp: bool) -> float:
        apps._SITES.clear()
        client = apps.make_client_app(settings, dp=dp)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in global_params.items()}),
                              "config": ConfigRecord({"server-round": 1, "local-steps": LOCAL_STEPS,
                                                      "clipping_norm": 1e-3})})
        message = Message(content=content, dst_node_id=1, message_type="train")
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = client(message, context)
        new = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        return float(np.sqrt(sum(np.sum((new[k] - global_params[k]) ** 2) for k in new)))

    assert update_norm(dp=False) > 1e-2
    assert update_norm(dp=True) <= 1e-3 * (1 + 1e-4)


def test_a_killed_federated_run_resumes_to_the_uninterrupted_result(stores, tmp_path):
    sites = stores
    config = _tiny(stores[0][1])
    whole = _settings(config, sites, tmp_path / "whole", strategy="fedadam", rounds=3)
    apps._SITES.clear()
    _run_local(whole, tmp_path / "whole")
    killed = _settings(config, sites, tmp_path / "killed", strategy="fedadam", rounds=3)
    apps._SITES.clear()
    with pytest.raises(KeyboardInterrupt):
        _run_local(killed, tmp_path / "killed", fail_in_round=3)  # the sites trained round 3; the server saved 2
    apps._SITES.clear()  # a new process: the sites' state comes from their folders
    summary = _run_local(killed, tmp_path / "killed")
    assert summary["resumed_after_round"] == 2
    for a, b in zip(jax.tree.leaves(_global_params(tmp_path / "whole")),
                    jax.tree.leaves(_global_params(tmp_path / "killed"))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    rounds = [r["round"] for r in runs.RunDir(tmp_path / "killed").read_metrics() if r["kind"] == "val"]
    assert rounds == [1, 2, 3]
    with pytest.raises(MedsegError, match="other settings"):
        _run_local(_settings(config, sites, tmp_path / "killed", strategy="fedavg", rounds=3), tmp_path / "killed")


def test_two_sites_two_rounds_through_flowers_simulation(stores, tmp_path, capsys):
    """`medseg federated` end to end: Flower's simulation runtime, per-site validation Dice per round, a global run
    directory that `medseg predict` uses."""
    workdir = tmp_path / "fed"
    sites = ",".join(f"{name}={store}" for name, store in stores)
    code = cli.main(["federated", "--config", str(REPO / "experiments" / "demo_ct.py"), "--sites", sites,
                     "--workdir", str(workdir), "--rounds", str(ROUNDS), "--local-steps", str(LOCAL_STEPS),
                     *TINY_OVERRIDES, "--config.data.val_cases=1"])
    assert code == 0, capsys.readouterr().err[-3000:]
    records = runs.RunDir(workdir).read_metrics()
    val = [r for r in records if r["kind"] == "val"]
    assert [r["round"] for r in val] == [1, 2]
    assert all(0 <= r["val_dice_A"] <= 1 and 0 <= r["val_dice_B"] <= 1 for r in val)
    assert (workdir / "federated_curve.png").stat().st_size > 0
    assert json.loads((workdir / "federated.json").read_text())["strategy"] == "fedavg"
    assert (workdir / "sites" / "A" / "checkpoints" / "rounds" / "2").is_dir()
    dataset = tmp_path / "ds"
    write_tiny_dataset(dataset, num_train=1, num_test=1)
    assert cli.main(["predict", "--run", str(workdir), "--input", str(dataset / "imagesTs"), "--output",
                     str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_flower_app_runs_on_a_superlink_with_a_supernode_per_site(stores, tmp_path):
    """Flower's Deployment Engine on localhost, as the README shows it: a SuperLink, one SuperNode per site (its store
    and folder in its node config), `flwr run scripts/flower_app`; the global run directory is an ordinary run."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    bin_dir = os.path.dirname(sys.executable)
    home = tmp_path / "flwr_home"
    home.mkdir()
    link_port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "here"\n\n[superlink.here]\n'
                                      f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs, processes = tmp_path / "logs", []
    logs.mkdir()

    def start(name, *command):
        log = open(logs / f"{name}.log", "w")
        processes.append(subprocess.Popen([os.path.join(bin_dir, command[0]), *command[1:]], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    workdir = tmp_path / "global"
    overrides = " ".join(o for o in TINY_OVERRIDES)
    run_config = (f"experiment='{REPO / 'experiments' / 'demo_ct.py'}' config-overrides='{overrides}' "
                  f"plans='{stores[0][1]}/plans.json' workdir='{workdir}' sites='A,B' rounds={ROUNDS} "
                  f"local-steps={LOCAL_STEPS}")
    try:
        start("superlink", "flower-superlink", "--insecure", "--port", str(link_port))
        time.sleep(5)
        for name, store in stores:
            start(f"site_{name}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(_free_port()),
                  "--node-config", f"site='{name}' store='{store}' workdir='{tmp_path / ('site_' + name)}'")
        time.sleep(5)
        result = subprocess.run([os.path.join(bin_dir, "flwr"), "run", str(REPO / "scripts" / "flower_app"), "here",
                                 "--stream", "--run-config", run_config], env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
        for process in processes:
            process.wait(timeout=30)
    site_logs = "".join((logs / f).read_text()[-2000:] for f in ("site_A.log", "site_B.log"))
    assert (workdir / "train_summary.json").is_file(), site_logs
    val = [r for r in runs.RunDir(workdir).read_metrics() if r["kind"] == "val"]
    assert [r["round"] for r in val] == [1, 2]
    assert all(0 <= r["val_dice_A"] <= 1 and 0 <= r["val_dice_B"] <= 1 for r in val)
    # each site kept its local state in a folder of its own for this global run, and a compilation cache
    for name in ("A", "B"):
        (run_folder,) = (tmp_path / f"site_{name}").glob("run-*")
        assert (run_folder / "checkpoints" / "rounds" / str(ROUNDS)).is_dir()
        assert any((tmp_path / f"site_{name}" / "jax_cache").iterdir())
    assert runs.load_params(workdir, checkpoint="latest")
    shutil.rmtree(home, ignore_errors=True)


def test_a_second_federated_command_on_the_same_workdir_is_refused_before_flower_starts(stores, tmp_path, capsys):
    from medseg_jax import fileio

    workdir = tmp_path / "fed"
    sites = ",".join(f"{name}={store}" for name, store in stores)
    with fileio.exclusive(workdir, "trained by medseg federated"):  # (as a running command holds it)
        code = cli.main(["federated", "--config", str(REPO / "experiments" / "demo_ct.py"), "--sites", sites,
                         "--workdir", str(workdir), "--rounds", "1", "--local-steps", "1", *TINY_OVERRIDES])
    err = capsys.readouterr().err
    assert code != 0 and "trained by medseg federated by another process" in err and "Traceback" not in err
    assert not workdir.exists()
