"""medseg-jax against nnU-Net v2's own pipeline on the same phantoms and machine, side by side in one run: train-step
rate of the same network, end-to-end iteration rate with data and augmentation, and Dice reached at equal wall-clock.

    python scripts/bench_vs_nnunet.py                         # CPU: patch 48x48x32, batch 2, features 8..64, 600 s
    python scripts/bench_vs_nnunet.py --tiny --out /tmp/b.json  # the test suite's size, a few minutes on 2 cores
    python scripts/bench_vs_nnunet.py --device cuda --patch 128,128,128 --features 32,64,128,256,320,320 \\
        --budget-seconds 3600 --cases 20                       # a GPU at nnU-Net's sizes (jax: its default backend)

Setup (shared by every part): `write_demo_dataset` writes CT phantoms (Decathlon layout; `--cases` + `--test-cases`);
they are copied into nnU-Net's raw layout (Dataset987_Phantoms, `CASE_0000.nii.gz`, dataset.json with channel_names,
labels, numTraining, file_ending) and planned and preprocessed by nnU-Net's own CLI, `nnUNetv2_plan_and_preprocess -d
987 -c 3d_fullres -overwrite_target_spacing S S S -overwrite_plans_name nnUNetPlans_bench` (nnUNet_raw,
nnUNet_preprocessed and nnUNet_results point into the scratch folder). The plans' 3d_fullres configuration is then
edited to medseg's network: `--patch` (reversed: nnU-Net's arrays are z, y, x where medseg's are the file's x, y, z),
`--batch`, `--features` with 3x3x3 kernels, stride 1 then 2 per stage, two convs per stage (PlainConvUNet, instance
norm, LeakyReLU: nnU-Net's default). splits_final.json gets medseg's hold-out (the last 2 case ids, sorted) as fold 0,
so both train on the same cases. medseg's store is prepared once by `medseg prepare` with the demo's data section at
the same spacing.

(a) Train-step rate, synthetic batches, no data loading. nnU-Net: a prepared `nnUNetTrainer` (the default trainer,
    made from the edited plans; `initialize()` builds the network with get_network_from_plans, deep supervision, its
    DC_and_CE_loss in DeepSupervisionWrapper, SGD nesterov 0.99 with poly) and its own `train_step(batch)` with the
    targets at the deep-supervision scales. Variants: fp32 (nnU-Net's default on CPU; on CUDA its default is AMP fp16
    autocast + GradScaler), `torch.compile` of the network (nnU-Net compiles by default on CUDA, never on CPU), and on
    CPU bf16 autocast (the same step under torch.autocast("cpu", bfloat16)). medseg: `build_experiment` of base.py
    (plain_unet, SGD/poly/grad clip 12 like nnU-Net, Dice+CE with deep supervision, augmentation "none" so that the
    step holds network + loss + optimizer as nnU-Net's does) and its jitted train step, fp32 and model.dtype bfloat16.
    `--warmup` steps, then `--steps` timed steps; steps/s = steps / their total time. Each side in a fresh process.
(b) End-to-end iterations/s with data and augmentation. nnU-Net: the trainer's `on_train_start()` (its
    `get_dataloaders()`: nnUNetDataLoader + batchgeneratorsv2 transforms in NonDetMultiThreadedAugmenter workers) on
    the preprocessed dataset, then `train_step(next(dataloader_train))`; once with the worker count nnU-Net picks
    itself (`get_allowed_n_proc_DA()`: nnUNet_n_proc_DA unset, recorded) and once with nnUNet_n_proc_DA = CPU cores
    (skipped when equal). medseg: `medseg train` (grain streaming from the store, on-device augmentation inside the
    step) with the "nnunet" augmentation preset (nnU-Net's transforms), and with the CT demo's own ("intensity");
    the rate is 1 / the mean wall time per step after the first (RUN/metrics.jsonl, `time_step_wall`). Both sides
    use all cores of the machine.
(c) Dice at equal wall-clock. A budget of `--budget-seconds` per side for the training process (launch to exit).
    nnU-Net: the default nnUNetTrainer through its Python API (the CLI cannot find other trainers here): the
    trainer is made as `get_trainer_from_args` makes it, then num_epochs, num_iterations_per_epoch and
    num_val_iterations_per_epoch are set so that the run ends within the budget at the rates measured in (b) (its
    poly schedule then ends with the budget), `run_training()` (no `perform_actual_validation`), then
    `nnUNetv2_predict` on imagesTs (checkpoint_final.pth, its default mirror TTA). medseg: `medseg train --config
    experiments/demo_ct.py` with train.steps fitted to the budget the same way (its cosine schedule ends with the
    budget), then `medseg predict` (the demo trains without mirroring, so it predicts without TTA). Both prediction
    folders are scored against labelsTs in one `medseg_jax.evaluate.evaluate` call (the same Dice code).

Ratios are medseg / nnU-Net rates (> 1: medseg faster). Results are printed and written as JSON (default
docs/bench_vs_nnunet_<platform>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Set before any process imports jax: quiet XLA's C++ logs (no other XLA flags: XLA:CPU uses every core by default).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATASET_ID, DATASET_NAME, PLANS_NAME = 987, "Dataset987_Phantoms", "nnUNetPlans_bench"
TINY = dict(patch=(32, 32, 16), features=(4, 8, 16), batch=2, steps=2, warmup=1, budget=25.0, cases=4, test_cases=2)
NNUNET_ITERATIONS_PER_EPOCH, NNUNET_VAL_PER_TRAIN = 250, 50 / 250  # nnU-Net's defaults: 250 iterations, 50 val
NNUNET_EPOCH_EXTRA_SECONDS = 1.5  # per epoch beyond its iterations: logging, progress plot, best checkpoint (estimate)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def say(text: str) -> None:
    print(f"[bench_vs_nnunet {time.strftime('%H:%M:%S')}] {text}", flush=True)


def medseg_exe() -> str:
    exe = Path(sys.executable).parent / "medseg"
    return str(exe) if exe.exists() else shutil.which("medseg") or "medseg"


def nnunet_exe(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name) or name


def run_logged(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> float:
    """Runs `cmd` with its output in `log`; returns its wall seconds; a failure ends the benchmark."""
    say("$ " + " ".join(cmd))
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        print(log.read_text()[-4000:], flush=True)
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); log {log}")
    return seconds


# --- setup: phantoms, nnU-Net raw + plans + preprocessing, medseg store -----------------------------------------------

def nnunet_env(work: Path, **extra) -> dict:
    env = dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"))
    env.pop("nnUNet_n_proc_DA", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def setup(args, work: Path) -> dict:
    from medseg_jax.data.phantoms import write_demo_dataset

    data = work / "phantoms"
    if not (data / "dataset.json").exists():
        write_demo_dataset(data, modality="ct", num_train=args.cases, num_test=args.test_cases, seed=0)
    source = json.loads((data / "dataset.json").read_text())
    train_ids = sorted(Path(e["image"]).name[:-len(".nii.gz")] for e in source["training"])
    test_ids = sorted(Path(p).name[:-len(".nii.gz")] for p in source["test"])
    say(f"phantoms: {len(train_ids)} training + {len(test_ids)} test CT cases in {data}")

    raw = work / "nnUNet_raw" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for case in train_ids:
        shutil.copyfile(data / "imagesTr" / f"{case}.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(data / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr" / f"{case}.nii.gz")
    for case in test_ids:
        shutil.copyfile(data / "imagesTs" / f"{case}.nii.gz", raw / "imagesTs" / f"{case}_0000.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": source["channel_names"],
        "labels": {name: int(value) for value, name in source["labels"].items()},
        "numTraining": len(train_ids), "file_ending": ".nii.gz", "name": "Phantoms"}, indent=1))

    pre = work / "nnUNet_preprocessed" / DATASET_NAME
    plans_path = pre / f"{PLANS_NAME}.json"
    spacing = [str(args.spacing)] * 3
    if not plans_path.exists():
        seconds = run_logged([nnunet_exe("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                              "-np", str(min(4, os.cpu_count())), "-npfp", str(min(4, os.cpu_count())),
                              "-overwrite_target_spacing", *spacing,
                              "-overwrite_plans_name", PLANS_NAME, "--no_pbar"],
                             work / "logs" / "nnunet_plan_and_preprocess.log", env=nnunet_env(work))
        say(f"nnUNetv2_plan_and_preprocess: {seconds:.0f} s")
        plans = json.loads(plans_path.read_text())
        (work / "nnunet_plans_as_planned.json").write_text(json.dumps(plans, indent=1))
        configuration = plans["configurations"]["3d_fullres"]
        stages = len(args.features)
        configuration["patch_size"] = list(reversed(args.patch))
        configuration["batch_size"] = args.batch
        configuration["architecture"]["arch_kwargs"].update(
            n_stages=stages, features_per_stage=list(args.features), kernel_sizes=[[3, 3, 3]] * stages,
            strides=[[1, 1, 1]] + [[2, 2, 2]] * (stages - 1), n_conv_per_stage=[2] * stages,
            n_conv_per_stage_decoder=[2] * (stages - 1))
        plans_path.write_text(json.dumps(plans, indent=1))
        # medseg's hold-out as fold 0: the last 2 case ids (sorted) validate, the others train.
        (pre / "splits_final.json").write_text(json.dumps([{"train": train_ids[:-2], "val": train_ids[-2:]}]))
    plans = json.loads(plans_path.read_text())
    planned = json.loads((work / "nnunet_plans_as_planned.json").read_text())["configurations"]["3d_fullres"]
    configuration = plans["configurations"]["3d_fullres"]
    say(f"nnU-Net plans {PLANS_NAME}: spacing {configuration['spacing']}, patch {configuration['patch_size']} "
        f"(planned {planned['patch_size']}), batch {configuration['batch_size']} (planned {planned['batch_size']}), "
        f"features {configuration['architecture']['arch_kwargs']['features_per_stage']} (planned "
        f"{planned['architecture']['arch_kwargs']['features_per_stage']})")

    store = work / "medseg_store"
    if not (store / "manifest.json").exists():
        seconds = run_logged([medseg_exe(), "prepare", "--source", str(data), "--out", str(store), "--config",
                              str(REPO / "medseg_jax" / "experiments" / "demo_ct.py"),
                              f"--config.data.target_spacing={args.spacing},{args.spacing},{args.spacing}"],
                             work / "logs" / "medseg_prepare.log")
        say(f"medseg prepare: {seconds:.0f} s")
    # medseg's experiment for (b) with nnU-Net's augmentation: the CT demo with the "nnunet" preset.
    (work / "exp_nnunet_aug.py").write_text(
        "from medseg_jax.augment.pipeline import augment_config\n"
        "from medseg_jax.experiments import demo_ct\n\n\n"
        "def get_config():\n"
        "    config = demo_ct.get_config()\n"
        "    config.augment = augment_config(\"nnunet\")\n"
        "    return config\n")
    return {"data": str(data), "train_ids": train_ids, "test_ids": test_ids, "plans": str(plans_path),
            "dataset_json": str(pre / "dataset.json"), "store": str(store), "num_classes": len(source["labels"]),
            "nnunet_planned": {"spacing": planned["spacing"], "patch_size": planned["patch_size"],
                               "batch_size": planned["batch_size"],
                               "features": planned["architecture"]["arch_kwargs"]["features_per_stage"],
                               "strides": planned["architecture"]["arch_kwargs"]["strides"]},
            "nnunet_used": {"spacing": configuration["spacing"], "patch_size": configuration["patch_size"],
                            "batch_size": configuration["batch_size"],
                            "features": configuration["architecture"]["arch_kwargs"]["features_per_stage"],
                            "strides": configuration["architecture"]["arch_kwargs"]["strides"]}}


def medseg_overrides(args, data: dict) -> list[str]:
    s = args.spacing
    return [f"--config.data.store={data['store']}", f"--config.data.target_spacing={s},{s},{s}",
            "--config.model.features=" + ",".join(map(str, args.features)),
            "--config.train.patch_size=" + ",".join(map(str, args.patch)), f"--config.train.batch_size={args.batch}"]


# --- workers: one fresh process per measurement ----------------------------------------------------------------------

def run_worker(job: dict, work: Path, env: dict | None = None) -> dict:
    path = work / f"job_{job['kind']}_{job.get('tag', '')}.json"
    path.write_text(json.dumps(job))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    log = work / "logs" / f"worker_{job['kind']}_{job.get('tag', '')}.log"
    lines = []
    with open(log, "w") as out, subprocess.Popen([sys.executable, __file__, "--worker", str(path)],
                                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                 env=env or dict(os.environ), cwd=REPO) as proc:
        for line in proc.stdout:  # the worker's progress lines as they come; everything into its log
            out.write(line)
            lines.append(line.rstrip("\n"))
            if line.startswith("[worker"):
                print(line, end="", flush=True)
    if proc.returncode != 0:
        print("\n".join(lines)[-4000:], flush=True)
        raise SystemExit(f"the {job['kind']} worker failed (exit {proc.returncode}); log {log}")
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    result["process_seconds"] = time.perf_counter() - started
    # 1-minute load averages around the process: above the core count, something else shared the cores
    result["load_average_before_after"] = [load_before, os.getloadavg()[0]]
    return result


def wsay(text: str) -> None:
    print(f"[worker {time.strftime('%H:%M:%S')}] {text}", flush=True)


def make_trainer(job: dict):
    """The default nnUNetTrainer as `get_trainer_from_args` makes it, from the edited plans."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    if job["device"] == "cpu":
        torch.set_num_threads(os.cpu_count())  # as nnunetv2.run.run_training does for -device cpu
    plans = load_json(job["plans"])
    plans["continue_training"] = False
    return nnUNetTrainer(plans=plans, configuration="3d_fullres", fold=0, dataset_json=load_json(job["dataset_json"]),
                         device=torch.device(job["device"]))


def timed_steps(step, warmup: int, steps: int) -> dict:
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_seconds = time.perf_counter() - started
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return {"warmup_seconds": warmup_seconds, "step_seconds": times, "steps_per_second": len(times) / sum(times),
            "median_step_seconds": sorted(times)[len(times) // 2]}


def worker_a_torch(job: dict) -> dict:
    import numpy as np
    import torch

    trainer = make_trainer(job)
    trainer.initialize()
    device = trainer.device
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.normal(size=(job["batch"], 1, *patch)).astype(np.float32))
    target = [torch.from_numpy(rng.integers(0, job["num_classes"], size=(job["batch"], 1, *[
        round(p * s) for p, s in zip(patch, scale)])).astype(np.float32)) for scale in scales]
    batch = {"data": data, "target": target}
    params = sum(p.numel() for p in trainer.network.parameters())
    results = {"params": int(params), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "network": type(trainer.network).__name__, "deep_supervision_outputs": len(scales),
               "loss": type(trainer.loss).__name__ + "(" + type(trainer.loss.loss).__name__ + ")",
               "optimizer": type(trainer.optimizer).__name__, "patch_zyx": list(patch), "variants": {}}
    default_label = "AMP fp16 (nnU-Net default on CUDA)" if device.type == "cuda" else "fp32 (nnU-Net default on CPU)"
    variants = [("default", default_label, None)]
    if job["torch_compile"]:
        variants.append(("compile", "torch.compile(network), " + default_label.split(" (")[0], "compile"))
    if device.type == "cpu" and job["autocast_bf16"]:
        variants.append(("bf16", "bf16 autocast on CPU", "bf16"))

    def bf16_step():  # the trainer's train_step, under CPU autocast (nnU-Net autocasts only on CUDA)
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            output = trainer.network(data.to(device))
            loss = trainer.loss(output, [t.to(device) for t in target])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
        trainer.optimizer.step()
        return loss.detach().cpu().numpy()

    trainer.network.train()
    plain_network = trainer.network
    for key, label, mode in variants:
        wsay(f"nnU-Net train_step, {label}: {job['warmup']} warm-up + {job['steps']} timed steps")
        entry = {"label": label}
        try:
            if mode == "compile":
                trainer.network = torch.compile(plain_network)
            else:
                trainer.network = plain_network
            step = bf16_step if mode == "bf16" else (lambda: trainer.train_step(batch))
            first = time.perf_counter()
            loss = step()
            entry["first_step_seconds"] = time.perf_counter() - first
            entry.update(timed_steps(step, max(0, job["warmup"] - 1), job["steps"]))
            entry["loss_after"] = float(trainer.train_step(batch)["loss"]) if mode != "bf16" else float(loss)
            wsay(f"  {entry['steps_per_second']:.3f} steps/s (median step {entry['median_step_seconds']:.3f} s, "
                 f"first step {entry['first_step_seconds']:.1f} s)")
        except Exception as exc:  # torch.compile or CPU autocast may fail on a machine: recorded, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            wsay(f"  failed: {entry['error']}")
        results["variants"][key] = entry
    trainer.network = plain_network
    return results


def worker_a_jax(job: dict) -> dict:
    import jax
    import numpy as np

    from medseg_jax.augment.pipeline import augment_config
    from medseg_jax.experiments.base import get_config as base_config
    from medseg_jax.models.registry import model_config
    from medseg_jax.parallel import mesh as mesh_lib
    from medseg_jax.train.experiment import build_experiment

    results = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "variants": {}}
    layout = mesh_lib.make_mesh_layout(mesh_lib.mesh_config(data=1))
    for dtype in job["dtypes"]:
        config = base_config("plain_unet")  # SGD nesterov 0.99, lr 1e-2, poly, weight decay 3e-5, clip 12: nnU-Net's
        stages = len(job["features"])
        config.model = model_config("plain_unet", features=tuple(job["features"]), deep_supervision=True,
                                    strides=((1, 1, 1),) + ((2, 2, 2),) * (stages - 1),
                                    kernel_sizes=((3, 3, 3),) * stages, dtype=dtype)
        config.augment = augment_config("none")  # nnU-Net's train_step holds no augmentation either
        config.train.batch_size, config.train.patch_size = job["batch"], tuple(job["patch"])
        experiment = build_experiment(config, job["num_classes"], 1, layout)
        state = experiment.init_state(jax.random.key(0))
        results["params"] = int(sum(np.size(v) for v in jax.tree.leaves(state.params)))
        rng = np.random.default_rng(0)
        shapes, shardings = experiment.batch_shapes, experiment.batch_shardings
        batch = {"image": jax.device_put(rng.normal(size=shapes["image"]).astype(np.float32), shardings["image"]),
                 "label": jax.device_put(rng.integers(0, job["num_classes"], size=shapes["label"]).astype(np.int32),
                                         shardings["label"])}
        key = jax.random.key(1)
        label = f"jit {dtype}" + (" (compute; params float32)" if dtype != "float32" else "")
        wsay(f"medseg train step, {label}: compile, {job['warmup']} warm-up + {job['steps']} timed steps")
        started = time.perf_counter()
        compiled = experiment.train_step.lower(state, batch, key).compile()
        compile_seconds = time.perf_counter() - started
        holder = {"state": state}

        def step(holder=holder, compiled=compiled, batch=batch, key=key):
            holder["state"], metrics = compiled(holder["state"], batch, key)
            jax.block_until_ready(metrics)
            holder["metrics"] = metrics

        entry = {"label": label, "compile_seconds": compile_seconds, **timed_steps(step, job["warmup"], job["steps"])}
        entry["loss_after"] = float(holder["metrics"]["loss"])
        wsay(f"  {entry['steps_per_second']:.3f} steps/s (median step {entry['median_step_seconds']:.3f} s, "
             f"compile {compile_seconds:.1f} s)")
        results["variants"][dtype] = entry
    return results


def worker_b_nnunet(job: dict) -> dict:
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    started = time.perf_counter()
    trainer = make_trainer(job)
    workers = get_allowed_n_proc_DA()
    wsay(f"nnU-Net on_train_start (get_dataloaders with {workers} augmentation workers; nnUNet_n_proc_DA="
         f"{os.environ.get('nnUNet_n_proc_DA', 'unset')})")
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    setup_seconds = time.perf_counter() - started
    data_wait = []

    def step():
        tick = time.perf_counter()
        batch = next(trainer.dataloader_train)
        data_wait.append(time.perf_counter() - tick)
        trainer.train_step(batch)

    wsay(f"  {job['warmup']} warm-up + {job['steps']} timed iterations (next(dataloader_train) + train_step)")
    entry = timed_steps(step, job["warmup"], job["steps"])
    import torch

    with torch.no_grad():  # the validation iterations an epoch also runs (for budgeting part c)
        trainer.on_validation_epoch_start()
        val = timed_steps(lambda: trainer.validation_step(next(trainer.dataloader_val)), 1, max(2, job["steps"] // 4))
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()
    entry.update(setup_seconds=setup_seconds, workers=workers, augmenter=type(trainer.dataloader_train).__name__,
                 data_wait_seconds=sum(data_wait[job["warmup"]:]) / job["steps"],
                 val_iteration_seconds=val["median_step_seconds"],
                 nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "unset"))
    wsay(f"  {entry['steps_per_second']:.3f} it/s (waiting for data {entry['data_wait_seconds']:.3f} s/it), "
         f"setup {setup_seconds:.1f} s, validation iteration {entry['val_iteration_seconds']:.3f} s")
    return entry


def worker_c_nnunet(job: dict) -> dict:
    import numpy as np

    trainer = make_trainer(job)
    trainer.num_epochs = job["epochs"]
    trainer.num_iterations_per_epoch = job["iterations_per_epoch"]
    trainer.num_val_iterations_per_epoch = job["val_iterations_per_epoch"]
    wsay(f"nnU-Net run_training: {job['epochs']} epochs x {job['iterations_per_epoch']} iterations "
         f"({job['val_iterations_per_epoch']} validation iterations per epoch)")
    started = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - started
    log = getattr(trainer.logger, "local_logger", trainer.logger).my_fantastic_logging  # (MetaLogger since 2.6)
    epochs = [end - start for start, end in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
    return {"run_training_seconds": seconds, "epoch_seconds": epochs,
            "final_train_loss": float(log["train_losses"][-1]), "final_pseudo_dice": float(np.mean(
                log["mean_fg_dice"][-1])), "output_folder": trainer.output_folder}


def worker_main(path: str) -> None:
    job = json.loads(Path(path).read_text())
    result = {"a_torch": worker_a_torch, "a_jax": worker_a_jax, "b_nnunet": worker_b_nnunet,
              "c_nnunet": worker_c_nnunet}[job["kind"]](job)
    print("RESULT " + json.dumps(result), flush=True)


# --- parts -----------------------------------------------------------------------------------------------------------

def part_a(args, work: Path, data: dict) -> dict:
    common = dict(plans=data["plans"], dataset_json=data["dataset_json"], device=args.device, batch=args.batch,
                  num_classes=data["num_classes"], warmup=args.warmup, steps=args.steps)
    say("(a) nnU-Net: the trainer's train_step on synthetic batches")
    torch_side = run_worker(dict(common, kind="a_torch", torch_compile=args.torch_compile,
                                 autocast_bf16=args.autocast_bf16), work,
                            env=nnunet_env(work, nnUNet_results=work / "nnUNet_results_a"))
    say("(a) medseg: build_experiment's jitted train step on synthetic batches")
    dtypes = ["float32"] + (["bfloat16"] if args.jax_bf16 else [])
    jax_side = run_worker(dict(common, kind="a_jax", patch=list(args.patch), features=list(args.features),
                               dtypes=dtypes), work)
    base = torch_side["variants"]["default"]
    ratios = {}
    for entry in jax_side["variants"].values():
        for tentry in torch_side["variants"].values():
            if "steps_per_second" in tentry:
                ratios[f"medseg {entry['label']} / nnU-Net {tentry['label']}"] = (
                    entry["steps_per_second"] / tentry["steps_per_second"])
    return {"nnunet": torch_side, "medseg": jax_side, "ratios": ratios,
            "params_equal": torch_side["params"] == jax_side["params"], "reference_rate": base.get("steps_per_second")}


def medseg_train(args, work: Path, data: dict, name: str, config: str, steps: int, extra=()) -> dict:
    from medseg_jax.runs import RunDir

    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [medseg_exe(), "train", "--config", config, "--workdir", str(run), *medseg_overrides(args, data),
           f"--config.train.steps={steps}", f"--config.train.val_every={steps}", *extra]
    load_before = os.getloadavg()[0]
    seconds = run_logged(cmd, work / "logs" / f"medseg_train_{name}.log",
                         env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "xla_cache")))
    summary = json.loads((run / "train_summary.json").read_text())
    records = [r for r in RunDir(run).read_metrics() if r.get("kind") == "train" and "time_step_wall" in r]
    previous, weighted, counted = 1, 0.0, 0  # the first record covers steps 2.. (the first step is compilation)
    for record in records:
        weighted += record["time_step_wall"] * (record["step"] - previous)
        counted += record["step"] - previous
        previous = record["step"]
    step_seconds = weighted / counted if counted else float("nan")
    return {"command": " ".join(cmd), "run": str(run), "process_seconds": seconds, "steps": summary["steps"],
            "step_seconds": step_seconds, "iterations_per_second": 1.0 / step_seconds if counted else float("nan"),
            "first_step_seconds": summary["first_step_seconds"], "train_seconds": summary["train_seconds"],
            "wall_seconds": summary["wall_seconds"], "best_val_dice": summary.get("best_val_dice"),
            "load_average_before_after": [load_before, os.getloadavg()[0]],
            "time_parts": {k: records[-1][k] for k in records[-1] if k.startswith("time_")} if records else {}}


def part_b(args, work: Path, data: dict) -> dict:
    cores = os.cpu_count()
    nnunet = {}
    say("(b) nnU-Net: dataloader + batchgeneratorsv2 augmentation + train_step, worker count nnU-Net picks itself")
    common = dict(kind="b_nnunet", plans=data["plans"], dataset_json=data["dataset_json"], device=args.device,
                  warmup=args.warmup, steps=args.steps)
    nnunet["default"] = run_worker(dict(common, tag="default"), work,
                                   env=nnunet_env(work, nnUNet_results=work / "nnUNet_results_b"))
    if nnunet["default"]["workers"] != cores:
        say(f"(b) nnU-Net with nnUNet_n_proc_DA={cores} (CPU cores)")
        nnunet["cores"] = run_worker(dict(common, tag="cores"), work, env=nnunet_env(
            work, nnUNet_results=work / "nnUNet_results_b", nnUNet_n_proc_DA=cores))
    else:
        say(f"(b) nnU-Net's own worker count is the core count ({cores}): one measurement serves both")
        nnunet["cores"] = {"same_as": "default"}
    medseg = {}
    steps = args.warmup + args.steps + 1
    say("(b) medseg train: grain streaming + on-device augmentation, nnU-Net's augmentation (\"nnunet\" preset)")
    medseg["nnunet_preset"] = medseg_train(args, work, data, "b_nnunet_preset", str(work / "exp_nnunet_aug.py"),
                                           steps, [f"--config.train.log_every={steps}"])
    say("(b) medseg train: the CT demo's augmentation (\"intensity\": brightness, contrast, noise)")
    medseg["demo_preset"] = medseg_train(args, work, data, "b_demo_preset",
                                         str(REPO / "medseg_jax" / "experiments" / "demo_ct.py"), steps,
                                         [f"--config.train.log_every={steps}"])
    for entry in medseg.values():
        say(f"  {entry['iterations_per_second']:.3f} it/s, first step (compile) {entry['first_step_seconds']} s, "
            f"process {entry['process_seconds']:.0f} s")
    reference = nnunet["default"]["steps_per_second"]
    ratios = {f"medseg ({name} augmentation) / nnU-Net ({n_name} workers)":
              entry["iterations_per_second"] / n_entry["steps_per_second"]
              for name, entry in (("nnunet-preset", medseg["nnunet_preset"]), ("demo", medseg["demo_preset"]))
              for n_name, n_entry in (("default", nnunet["default"]), ("cores", nnunet["cores"]))
              if "steps_per_second" in n_entry}
    return {"nnunet": nnunet, "medseg": medseg, "ratios": ratios, "cores": cores, "reference_rate": reference}


def part_c(args, work: Path, data: dict, b: dict) -> dict:
    budget = args.budget_seconds
    # nnU-Net: epochs x iterations fitted to the budget from (b)'s rates (process setup, iterations, validation
    # iterations, a per-epoch allowance).
    nb = b["nnunet"]["default"]
    t_it, t_val = 1.0 / nb["steps_per_second"], nb["val_iteration_seconds"]
    setup = nb["process_seconds"] - nb["warmup_seconds"] - sum(nb["step_seconds"])
    setup -= nb["val_iteration_seconds"] * (1 + max(2, args.steps // 4))
    left = max(0.0, budget - setup - 5.0)  # 5 s: on_train_end (final checkpoint, loader shutdown), process exit
    total_iterations = left / (t_it * (1 + NNUNET_VAL_PER_TRAIN * t_val / t_it))
    per_epoch = int(min(NNUNET_ITERATIONS_PER_EPOCH, max(1, math.ceil(total_iterations / 10))))
    val_per_epoch = max(1, round(per_epoch * NNUNET_VAL_PER_TRAIN))
    epoch_cost = per_epoch * t_it + val_per_epoch * t_val + NNUNET_EPOCH_EXTRA_SECONDS
    epochs = max(1, int(left // epoch_cost))
    # medseg: steps fitted from (b)'s demo-augmentation run: its fixed cost (launch, store, compile, final
    # validation) = process seconds - the steps after the first.
    mb = b["medseg"]["demo_preset"]
    fixed = mb["process_seconds"] - (mb["steps"] - 1) * mb["step_seconds"]
    steps = max(1, int((budget - fixed) // mb["step_seconds"]))
    say(f"(c) budget {budget:.0f} s per side. nnU-Net: setup ~{setup:.0f} s, {t_it:.2f} s/iteration -> {epochs} "
        f"epochs x {per_epoch} iterations (+{val_per_epoch} validation). medseg: fixed ~{fixed:.0f} s, "
        f"{mb['step_seconds']:.2f} s/step -> {steps} steps")

    say("(c) nnU-Net: nnUNetTrainer.run_training() under the budget")
    env = nnunet_env(work)
    shutil.rmtree(work / "nnUNet_results", ignore_errors=True)
    nn = run_worker(dict(kind="c_nnunet", plans=data["plans"], dataset_json=data["dataset_json"], device=args.device,
                         epochs=epochs, iterations_per_epoch=per_epoch, val_iterations_per_epoch=val_per_epoch),
                    work, env=env)
    nn.update(epochs=epochs, iterations_per_epoch=per_epoch, val_iterations_per_epoch=val_per_epoch,
              iterations=epochs * per_epoch)
    say(f"  nnU-Net trained {epochs * per_epoch} iterations in {nn['process_seconds']:.0f} s (process; "
        f"run_training {nn['run_training_seconds']:.0f} s)")
    pred_nnunet = work / "predictions" / "nnunet"
    shutil.rmtree(pred_nnunet, ignore_errors=True)
    predict_cmd = [nnunet_exe("nnUNetv2_predict"), "-i", str(work / "nnUNet_raw" / DATASET_NAME / "imagesTs"), "-o",
                   str(pred_nnunet), "-d", str(DATASET_ID), "-c", "3d_fullres", "-p", PLANS_NAME, "-f", "0", "-chk",
                   "checkpoint_final.pth", "-device", args.device, "--disable_progress_bar"]
    nn["predict_seconds"] = run_logged(predict_cmd, work / "logs" / "nnunet_predict.log", env=env)
    nn["predict_command"] = " ".join(predict_cmd[:1] + predict_cmd[1:])

    say("(c) medseg: medseg train (demo_ct) under the budget")
    ms = medseg_train(args, work, data, "c_demo", str(REPO / "medseg_jax" / "experiments" / "demo_ct.py"), steps)
    say(f"  medseg trained {ms['steps']} steps in {ms['process_seconds']:.0f} s (process; loop {ms['train_seconds']}"
        f" s, first step {ms['first_step_seconds']} s)")
    pred_medseg = work / "predictions" / "medseg"
    shutil.rmtree(pred_medseg, ignore_errors=True)
    ms["predict_seconds"] = run_logged([medseg_exe(), "predict", "--run", ms["run"], "--input",
                                        str(Path(data["data"]) / "imagesTs"), "--output", str(pred_medseg)],
                                       work / "logs" / "medseg_predict.log",
                                       env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(work / "xla_cache")))
    # nnU-Net also writes dataset.json, plans.json and predict_from_raw_data_args.json beside its label maps
    for extra in pred_nnunet.glob("*.json"):
        extra.rename(work / "predictions" / f"nnunet_{extra.name}")

    from medseg_jax.evaluate import evaluate

    evaluation = work / "evaluation"
    shutil.rmtree(evaluation, ignore_errors=True)
    summary = evaluate([pred_medseg, pred_nnunet], Path(data["data"]) / "labelsTs", evaluation,
                       dataset_json=Path(data["data"]) / "dataset.json")
    dice = {}
    for side in ("medseg", "nnunet"):
        stats = summary["metrics"][side]
        dice[side] = {"mean_foreground": stats["foreground_mean"]["dice"],
                      "per_class": {name: c["dice"]["mean"] for name, c in stats["per_class"].items()}}
    comparisons = [c for c in summary["comparisons"] if c["metric"] == "dice"]  # per class, paired over cases
    return {"budget_seconds": budget, "nnunet": nn, "medseg": ms, "dice": dice, "evaluation": str(evaluation),
            "wilcoxon_dice_per_class": comparisons,
            "ratio_dice": dice["medseg"]["mean_foreground"] / dice["nnunet"]["mean_foreground"]
            if dice["nnunet"]["mean_foreground"] else float("nan")}


# --- main ------------------------------------------------------------------------------------------------------------

def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")) / 2 ** 20
    except (OSError, StopIteration):
        mem = float("nan")
    return f"{model}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.node()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="a,b,c", help="parts to run: a (train step), b (end to end), c (Dice at "
                        "equal wall-clock; uses b's rates, so b runs with it)")
    parser.add_argument("--patch", type=ints, default=(48, 48, 32), help="medseg's patch (x, y, z)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=ints, default=(8, 16, 32, 64), help="features per stage (>= 3 stages: "
                        "nnU-Net's deep supervision weights are 0/0 with 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (a) and iterations (b)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-seconds", type=float, default=600.0, help="(c) training wall-clock per side")
    parser.add_argument("--spacing", type=float, default=5.0, help="target spacing (mm, isotropic) of both plans")
    parser.add_argument("--cases", type=int, default=20, help="training phantoms")
    parser.add_argument("--test-cases", type=int, default=5, help="test phantoms (c)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device (jax: its default "
                        "backend)")
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                        help="(a) skip the torch.compile variant")
    parser.add_argument("--no-autocast-bf16", dest="autocast_bf16", action="store_false",
                        help="(a) skip torch's CPU bf16 autocast variant")
    parser.add_argument("--no-jax-bf16", dest="jax_bf16", action="store_false",
                        help="(a) skip medseg's model.dtype=bfloat16 variant")
    parser.add_argument("--tiny", action="store_true", help=f"test-suite size: {TINY}; torch.compile and the bf16 "
                        "variants off")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", help="JSON results (default docs/bench_vs_nnunet_<platform>.json)")
    parser.add_argument("--read", metavar="JSON", help="print the tables of a results file and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return
    if args.read:
        print_report(json.loads(Path(args.read).read_text()))
        return
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    if not parts <= {"a", "b", "c"}:
        parser.error(f"--part {args.part}: choose from a, b, c")
    if args.tiny:
        args.patch, args.features, args.batch = TINY["patch"], TINY["features"], TINY["batch"]
        args.steps, args.warmup, args.budget_seconds = TINY["steps"], TINY["warmup"], TINY["budget"]
        args.cases, args.test_cases = TINY["cases"], TINY["test_cases"]
        args.torch_compile = args.autocast_bf16 = args.jax_bf16 = False
    if len(args.features) < 3:
        parser.error("--features: give at least 3 stages (nnU-Net's deep supervision drops the lowest output and "
                     "normalises the rest: with 2 stages its weights are 0/0)")
    if len(args.patch) != 3 or any(p % 2 ** (len(args.features) - 1) for p in args.patch):
        parser.error(f"--patch {args.patch}: three sizes, each divisible by 2^(stages-1)")
    if args.cases < 3:
        parser.error("--cases: at least 3 (2 validate)")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_vs_nnunet_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)

    import jax
    import torch

    device = jax.devices()[0]
    out_json = Path(args.out) if args.out else REPO / "docs" / f"bench_vs_nnunet_{device.platform}.json"
    started = time.perf_counter()
    say(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} {machine()}; jax {jax.__version__} "
        f"({device.platform}, {device.device_kind}), torch {torch.__version__} (--device {args.device}); patch "
        f"{args.patch}, batch {args.batch}, features {args.features}, parts {','.join(sorted(parts))}; scratch {work}")
    del jax, torch  # the measurements run in fresh processes

    data = setup(args, work)
    result = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "platform": device.platform, "device_kind": device.device_kind,
              "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
              "settings": {"patch_xyz": list(args.patch), "batch": args.batch, "features": list(args.features),
                           "steps": args.steps, "warmup": args.warmup, "budget_seconds": args.budget_seconds,
                           "spacing": args.spacing, "cases": args.cases, "test_cases": args.test_cases,
                           "torch_device": args.device, "tiny": args.tiny},
              "setup": {k: v for k, v in data.items() if k.startswith("nnunet_")}}
    from importlib.metadata import version

    result["versions"] = {name: version(name) for name in ("jax", "flax", "torch", "nnunetv2",
                                                           "dynamic_network_architectures", "batchgeneratorsv2")}
    if "a" in parts:
        result["a"] = part_a(args, work, data)
    if "b" in parts or "c" in parts:
        result["b"] = part_b(args, work, data)
        if "b" not in parts:
            result["b"]["calibration_only"] = True
    if "c" in parts:
        result["c"] = part_c(args, work, data, result["b"])
    result["total_seconds"] = time.perf_counter() - started

    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_report(result)
    say(f"wrote {out_json} ({result['total_seconds']:.0f} s in all)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def print_report(result: dict) -> None:
    """The tables and ratio lines of a result (also: --read JSON)."""
    settings = result["settings"]
    patch, batch, features = tuple(settings["patch_xyz"]), settings["batch"], tuple(settings["features"])
    print()
    if "a" in result:
        a = result["a"]
        print(f"(a) train step, synthetic batches, patch {patch} batch {batch} features "
              f"{features}; parameters nnU-Net {a['nnunet']['params']:,} / medseg {a['medseg']['params']:,}")
        print("| side | variant | steps/s | median step (s) | first step / compile (s) |")
        print("|---|---|---:|---:|---:|")
        for side, name in (("nnunet", "nnU-Net (PyTorch)"), ("medseg", "medseg (JAX)")):
            for entry in a[side]["variants"].values():
                if "steps_per_second" not in entry:
                    print(f"| {name} | {entry['label']} | failed: {entry.get('error', '')[:80]} | | |")
                    continue
                first = entry.get("compile_seconds", entry.get("first_step_seconds"))
                print(f"| {name} | {entry['label']} | {entry['steps_per_second']:.3f} | "
                      f"{entry['median_step_seconds']:.3f} | {first:.1f} |")
        for label, ratio in a["ratios"].items():
            print(f"ratio (a) train step, {label}: {ratio:.2f}")
        for key, name in (("compile", "torch.compile"), ("bf16", "torch bf16 autocast")):
            if key not in a["nnunet"]["variants"]:
                print(f"(a) {name}: not run")
    if "b" in result and not result["b"].get("calibration_only"):
        b = result["b"]
        print(f"\n(b) end to end with data and augmentation, {b['cores']} CPU cores")
        print("| side | setting | iterations/s |")
        print("|---|---|---:|")
        for entry in b["nnunet"].values():
            if "steps_per_second" in entry:
                print(f"| nnU-Net | {entry['workers']} augmentation workers ({entry['augmenter']}; nnUNet_n_proc_DA "
                      f"{entry['nnUNet_n_proc_DA']}) | {entry['steps_per_second']:.3f} |")
        for key, entry in b["medseg"].items():
            print(f"| medseg | {key.replace('_', ' ')} | {entry['iterations_per_second']:.3f} |")
        print(f"nnU-Net picked {b['nnunet']['default']['workers']} augmentation workers (get_allowed_n_proc_DA)")
        for label, ratio in b["ratios"].items():
            print(f"ratio (b) end to end, {label}: {ratio:.2f}")
    if "c" in result:
        c = result["c"]
        print(f"\n(c) Dice on {settings['test_cases']} test cases after a {c['budget_seconds']:.0f} s training budget "
              "per side")
        print("| side | trained | training process (s) | predict (s) | mean foreground Dice | per class |")
        print("|---|---|---:|---:|---:|---|")
        for side, name, trained in (
                ("medseg", "medseg", f"{c['medseg']['steps']} steps"),
                ("nnunet", "nnU-Net", f"{c['nnunet']['epochs']} x {c['nnunet']['iterations_per_epoch']} iterations")):
            d = c["dice"][side]
            print(f"| {name} | {trained} | {c[side]['process_seconds']:.0f} | {c[side]['predict_seconds']:.0f} | "
                  f"{d['mean_foreground']:.4f} | " + ", ".join(f"{k} {v:.3f}" for k, v in d["per_class"].items())
                  + " |")
        print(f"Dice (c) at equal wall-clock: medseg {c['dice']['medseg']['mean_foreground']:.4f}, nnU-Net "
              f"{c['dice']['nnunet']['mean_foreground']:.4f}")
        print(f"ratio (c) Dice medseg / nnU-Net: {c['ratio_dice']:.3f}")


if __name__ == "__main__":
    main()
