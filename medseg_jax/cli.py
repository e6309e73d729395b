"""`medseg` command line: parses arguments, calls one function per command, maps MedsegError to exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path


def _overrides(unknown: list[str], parser: argparse.ArgumentParser) -> list[str]:
    overrides = [u for u in unknown if u.startswith("--config.")]
    others = [u for u in unknown if not u.startswith("--config.")]
    if others:
        parser.error(f"unrecognized arguments: {' '.join(others)}")
    return overrides


def cmd_demo_data(args) -> None:
    from medseg_jax.data.phantoms import write_demo_dataset

    out = write_demo_dataset(args.out, modality=args.modality, num_train=args.cases, num_test=args.test_cases,
                             seed=args.seed, num_unlabelled=args.unlabelled_cases, scanner=args.scanner)
    more = f" and {args.unlabelled_cases} unlabelled" if args.unlabelled_cases else ""
    scanner = f" (scanner profile {args.scanner})" if args.scanner != "reference" else ""
    print(f"wrote {args.cases} training, {args.test_cases} test{more} {args.modality.upper()} cases{scanner} to {out}")


def _mesh_overrides(text: str | None) -> list[str]:
    """--mesh data=D,space=S -> --config.mesh.data=D --config.mesh.space=S."""
    if not text:
        return []
    from medseg_jax.parallel.mesh_flag import parse_mesh_arg

    return [f"--config.mesh.{name}={value}" for name, value in parse_mesh_arg(text).items()]


def cmd_pretrain(args, overrides) -> None:
    cmd_train(args, overrides, task="pretrain")


def cmd_train(args, overrides, task: str = "segment") -> None:
    from medseg_jax.parallel import distributed

    # Before anything touches a device: join the other processes of a multi-host run (flags or a detected cluster).
    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    from medseg_jax import config as config_lib
    from medseg_jax import runs
    from medseg_jax.errors import MedsegError
    from medseg_jax.train.loop import train

    overrides = _mesh_overrides(args.mesh) + list(overrides)
    init_from = getattr(args, "init_from", None)
    command = "medseg pretrain" if task == "pretrain" else "medseg train"

    run = runs.RunDir(args.workdir)
    if args.resume or (not args.config and run.config_path.is_file() and not run.has_checkpoint()):
        # --resume, or a run directory that `medseg plan` prepared
        config = config_lib.apply_overrides(run.load_config(), overrides)
        made_by = config.get("task", "segment")
        if args.resume and made_by != task:
            other = "medseg pretrain" if made_by == "pretrain" else "medseg train"
            raise MedsegError(f"{run.path}: this run was started by `{other}`; resume it with `{other} --resume`, "
                              f"not `{command}`")
    elif init_from and not args.config:  # fine-tune with the source run's whole config (model included)
        config = runs.RunDir(init_from).load_config()
        with config.unlocked():
            config.train.init_from = ""
        config = config_lib.apply_overrides(config, overrides)
    else:
        if not args.config:
            raise MedsegError("--config is required (an experiment file such as experiments/demo_ct.py), unless "
                              "--workdir was planned with `medseg plan` or --init-from names a run to fine-tune")
        config = config_lib.load_config(args.config, overrides)
    with config.unlocked():
        config.task = task  # one experiment file serves both commands
    if init_from:
        with config.train.unlocked():
            config.train.init_from = str(init_from)
    if args.dataset:
        config.data.dataset = args.dataset
    if getattr(args, "store", None):
        config.data.store = args.store
    summary = train(config, args.workdir, resume=args.resume, profile_steps=args.profile or 0)
    import jax

    if jax.process_index() != 0:
        return
    if task == "pretrain":
        print(f"pretrained {summary['steps']} steps in {summary['train_seconds']:.0f} s on {summary['device']}; "
              f"fine-tune with `medseg train --config ... --init-from {args.workdir}`")
        return
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s on {summary['device']}; "
          f"best validation Dice {summary['best_val_dice']}; run directory {args.workdir}")


def cmd_federated(args, overrides) -> None:
    from medseg_jax import config as config_lib
    from medseg_jax.errors import MedsegError

    try:
        from medseg_jax.federated.apps import federate, parse_sites
    except ImportError as error:
        raise MedsegError(f"federated training needs Flower: pip install 'medseg-jax[federated]' ({error})") from None
    config = config_lib.load_config(args.config, overrides)
    summary = federate(config, parse_sites(args.sites), args.workdir, rounds=args.rounds, local_steps=args.local_steps,
                       strategy=args.strategy, proximal_mu=args.proximal_mu, server_lr=args.server_lr,
                       dp_clip=args.dp_clip, dp_noise=args.dp_noise, num_gpus_per_site=args.gpus_per_site)
    resumed = f" (resumed after round {summary['resumed_after_round']})" if summary["resumed_after_round"] else ""
    print(f"federated: {summary['rounds']} rounds x {summary['local_steps']} local steps{resumed}; best mean "
          f"validation Dice {summary['best_val_dice']}; global run directory {args.workdir}")


def prepare_data_config(config_path, overrides):
    """The `data` config for `medseg prepare`: defaults, then the experiment file's data section, then overrides."""
    import ml_collections

    from medseg_jax import config as config_lib
    from medseg_jax.data.fingerprint import default_data_config

    config = ml_collections.ConfigDict({"data": default_data_config()})
    if config_path:
        loaded = config_lib.load_config_file(config_path)
        if "data" in loaded:
            for key, value in loaded.data.items():
                if key in config.data:
                    config.data[key] = value
    unknown = [o for o in overrides if not o.startswith(("--config.data.", "config.data."))]
    if unknown:
        from medseg_jax.errors import MedsegError

        raise MedsegError(f"{unknown[0]}: medseg prepare reads only config keys under data.")
    from medseg_jax.experiments import schema

    return schema.check(config_lib.apply_overrides(config, overrides)).data


@contextlib.contextmanager
def _validation_report(report_path: str | None):
    """A failed validation prints one line per bad case (and writes them as TSV to `report_path`) before its error."""
    from medseg_jax.data.prepare import ValidationFailed, report_tsv

    try:
        yield
    except ValidationFailed as failure:
        for line in failure.report:
            print(line, file=sys.stderr)
        if report_path:
            from medseg_jax import fileio

            fileio.write_text(report_path, report_tsv(failure.problems))
        raise


def cmd_prepare(args, overrides) -> None:
    from medseg_jax.data.prepare import format_plan, prepare

    data_config = prepare_data_config(args.config, overrides)
    with _validation_report(args.report):
        result = prepare(args.source, args.out, data_config, skip_bad=args.skip_bad, workers=args.workers,
                         unlabelled=args.unlabelled, plan_from=args.plan_from)
    print(f"prepared {result['cases']} cases ({result['prepared_now']} now) into {result['store']}: "
          f"{format_plan(result['plan'])}")
    if result["problems"]:
        print(f"left out {len(result['problems'])} bad case(s); report: {result['store']}/validation_report.tsv",
              file=sys.stderr)
        for problem in result["problems"]:
            print(problem.line(), file=sys.stderr)


def cmd_dataset(args) -> None:
    from medseg_jax.data import add

    if args.action == "versions":
        for entry in add.history(args.store):
            what = (f"{entry['cases']} cases" if "cases" in entry else
                    f"added {len(entry['added'])}, replaced {len(entry['replaced'])} from {entry['source']} at "
                    f"{entry['time']}")
            print(f"version {entry['version']}: {entry['made_by']}: {what}")
        return
    with _validation_report(args.report):
        result = add.add_cases(args.store, args.source, args.cases, images=args.images, labels=args.labels,
                               replace=args.replace, skip_bad=args.skip_bad, workers=args.workers)
    print(f"{result['store']} is now version {result['version']} ({result['cases']} cases): added "
          f"{len(result['added'])}, replaced {len(result['replaced'])}; fine-tune with `medseg train --init-from RUN "
          f"--store {result['store']} --workdir NEW_RUN`")
    for problem in result["problems"]:
        print(f"left out: {problem.line()}", file=sys.stderr)


def _mirror_axes(args):
    if args.disable_tta:
        return ()
    if args.mirror_axes is None:
        return None
    from medseg_jax.errors import MedsegError
    from medseg_jax.experiments.schema import mirror_axes

    try:
        axes = tuple(int(a) for a in args.mirror_axes.split(",") if a.strip())
    except ValueError:
        raise MedsegError(f"--mirror-axes {args.mirror_axes}: expected patch axes such as 0,1,2") from None
    mirror_axes("--mirror-axes", axes)
    return axes


def cmd_predict(args) -> None:
    from medseg_jax.parallel.mesh_flag import parse_mesh_arg
    from medseg_jax.predict import predict, read_postprocessing

    result = predict(args.run or (), args.input, args.output, overwrite=args.overwrite, skip_bad=args.skip_bad,
                     checkpoint=args.checkpoint, mesh=parse_mesh_arg(args.mesh) if args.mesh else None,
                     plan=args.plan, model=args.model, mirror_axes=_mirror_axes(args),
                     postprocessing=read_postprocessing(args.postprocessing) if args.postprocessing else None,
                     save_probabilities=args.save_probabilities, output_format=args.output_format, qc=args.qc,
                     pre_annotations=args.pre_annotations)
    skipped = f" ({len(result['skipped'])} already there from this run)" if result["skipped"] else ""
    qc = f"; quality control in {args.output}/qc (ranking.csv, report.json, montage.png)" if args.qc else ""
    print(f"wrote {len(result['written'])} predictions to {args.output}{skipped}{qc}")
    for failure in result["failed"]:
        print(f"skipped {failure['case']}: {failure['problem']}", file=sys.stderr)


def cmd_rank(args) -> None:
    from medseg_jax.parallel.mesh_flag import parse_mesh_arg
    from medseg_jax.rank import rank

    report = rank(args.run or (), args.input, args.out, plan=args.plan, checkpoint=args.checkpoint,
                  mirror_axes=_mirror_axes(args), mesh=parse_mesh_arg(args.mesh) if args.mesh else None,
                  top=args.top, overwrite=args.overwrite, skip_bad=args.skip_bad, ood_threshold=args.ood_threshold)
    cases = report["cases"]
    flagged = sum(1 for c in cases if c["flag"])
    print(f"ranked {len(cases)} cases by {', '.join(report['ranked_by'])} ({flagged} flagged); first: "
          + ", ".join(f"{c['case']} ({c['priority']:.2f})" for c in cases[:3])
          + f"; {args.out}/ranking.csv, report.json, montage.png")
    for failure in report["failed"]:
        print(f"skipped {failure['case']}: {failure['problem']}", file=sys.stderr)


def cmd_ensemble(args) -> None:
    from medseg_jax.predict import ensemble, read_postprocessing

    rules = read_postprocessing(args.postprocessing) if args.postprocessing else None
    result = ensemble(args.input, args.output, postprocessing=rules, overwrite=args.overwrite,
                      save_probabilities=args.save_probabilities)
    print(f"wrote {len(result['written'])} ensembled label maps to {args.output}")


def cmd_export(args) -> None:
    from medseg_jax import export
    from medseg_jax.predict import read_postprocessing

    manifest = export.export_model(args.run or (), args.out, plan=args.plan, checkpoint=args.checkpoint,
                                   platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()),
                                   postprocessing=read_postprocessing(args.postprocessing)
                                   if args.postprocessing else None, overwrite=args.overwrite)
    print(f"exported {export.describe(manifest)} to {args.out}; predict with "
          f"`medseg predict --model {args.out} --input ... --output ...`")


def cmd_evaluate(args) -> None:
    from medseg_jax.evaluate import evaluate

    summary = evaluate(args.pred, args.ref, args.out, dataset_json=args.dataset_json, overwrite=args.overwrite,
                       tolerance_mm=args.tolerance, surface=args.surface, workers=args.workers)
    from medseg_jax.metrics.report import dice_table

    print(dice_table(summary))
    for comparison in summary["comparisons"]:
        if comparison["metric"] == "dice" and comparison["p_value"] is not None:
            print(f"{comparison['a']} vs {comparison['b']}, {comparison['name']} Dice: median difference "
                  f"{comparison['median_difference']:+.4f}, Wilcoxon p = {comparison['p_value']:.3g} "
                  f"(n = {comparison['n']})")
    print(f"reports in {args.out}")


def cmd_demo(args, overrides) -> None:
    from medseg_jax.demo import DEMO_CASES, run_demo

    cases, test_cases = DEMO_CASES.get(args.modality, (20, 5))
    run_demo(args.out, modality=args.modality, num_train=cases if args.cases is None else args.cases,
             num_test=test_cases if args.test_cases is None else args.test_cases, seed=args.seed,
             config_path=args.config, overrides=overrides)


def cmd_plan(args, overrides) -> None:
    from medseg_jax import config as config_lib
    from medseg_jax import fileio, runs
    from medseg_jax.data.training_store import open_training_store
    from medseg_jax.errors import MedsegError
    from medseg_jax.experiments import schema
    from medseg_jax.train.planner import format_report, plan_experiment

    run = runs.RunDir(args.workdir)
    if run.config_path.exists():
        raise MedsegError(f"{run.config_path}: already exists; plan into a new run directory (nothing was "
                          "overwritten)")
    config = schema.check(config_lib.load_config(args.config, overrides))
    store = open_training_store(config.data, run.path)
    planned, report = plan_experiment(config, store.plan, num_cases=len(store.case_ids), budget_gb=args.budget_gb,
                                      progress=print)
    run.path.mkdir(parents=True, exist_ok=True)
    fileio.write_json(run.path / "model_plan.json", report)
    run.save_config(planned)
    print(format_report(report))
    print(f"wrote {run.config_path} and {run.path / 'model_plan.json'}; train with "
          f"`medseg train --workdir {run.path}`")


def simulate_devices(count: int) -> None:
    """Lets JAX's CPU backend offer `count` devices (set before jax is imported; a no-op afterwards)."""
    if "jax" in sys.modules:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f]
    current = [f for f in flags if f.startswith("--xla_force_host_platform_device_count=")]
    if current and int(current[-1].split("=", 1)[1]) >= count:
        return
    flags = [f for f in flags if f not in current] + [f"--xla_force_host_platform_device_count={count}"]
    os.environ["XLA_FLAGS"] = " ".join(flags)


def cmd_memory(args, overrides) -> None:
    import json
    import math

    from medseg_jax.errors import MedsegError
    from medseg_jax.parallel.mesh_flag import parse_mesh_arg

    shape = parse_mesh_arg(args.mesh)
    if shape.get("data", 1) < 1:
        raise MedsegError(f"--mesh {args.mesh}: give the data axis as a number of devices (>= 1)")
    needed = math.prod(shape.values())
    simulate_devices(needed)  # CPU devices stand in when this machine has fewer accelerators than the mesh

    from medseg_jax import config as config_lib
    from medseg_jax.experiments import schema
    from medseg_jax.parallel import mesh as mesh_lib
    from medseg_jax.train.memory import step_memory

    config = schema.check(config_lib.load_config(args.config, overrides + _mesh_overrides(args.mesh)))
    devices, simulated = mesh_lib.devices_for_compile(needed)
    num_classes, in_channels = args.classes, args.channels
    if (num_classes is None or in_channels is None) and config.data.get("store"):
        from medseg_jax.data.store import Store

        plan = Store(config.data.store).plan
        num_classes = num_classes or len(plan["labels"])
        in_channels = in_channels or len(plan["normalization"])
    layout = mesh_lib.make_mesh_layout(config.mesh, devices=devices, spatial_dims=len(config.train.patch_size))
    report = step_memory(config, num_classes or 2, in_channels or 1, layout, simulated=simulated)
    print(json.dumps(report, indent=2))
    if simulated:
        print(f"medseg memory: compiled for {needed} simulated CPU devices: the CPU program's memory; measure on "
              "the target accelerators for exact figures", file=sys.stderr)


def cmd_sweep(args, overrides) -> None:
    from medseg_jax.sweep import results as results_lib
    from medseg_jax.sweep.runner import run_sweep

    if args.dataset:
        overrides = [f"--config.data.dataset={args.dataset}"] + list(overrides)
    slurm = {key: value for key, value in (("slurm_partition", args.partition), ("gpus_per_node", args.gpus),
                                           ("timeout_min", args.time), ("slurm_account", args.account))
             if value is not None}
    from medseg_jax.errors import MedsegError

    try:
        manifest = run_sweep(args.sweep, args.workdir, folds=args.folds, executor=args.executor,
                             max_parallel=args.max_parallel, overrides=overrides, slurm=slurm)
    except MedsegError:
        # some runs failed (or the sweep was refused): the table of what did finish is still worth writing
        if (Path(args.workdir) / "sweep.json").is_file():
            with contextlib.suppress(MedsegError):
                results_lib.results(args.workdir)
        raise
    content = results_lib.results(args.workdir)
    print(results_lib.markdown_table(content["trials"], content["baseline"]), end="")
    print(f"swept {len(manifest['trials'])} trials x {len(manifest['folds'])} folds in {args.workdir}; table and "
          f"per-case scores in {args.workdir}/results/")


def cmd_results(args) -> None:
    from medseg_jax.sweep import results as results_lib

    content = results_lib.results(args.workdir, args.out, tolerance_mm=args.tolerance, workers=args.workers)
    print(results_lib.markdown_table(content["trials"], content["baseline"]), end="")
    print(f"wrote results.md, results.csv, results.json, per_case.csv and results.png to "
          f"{args.out or args.workdir + '/results'}")
    if args.find_best:
        from medseg_jax.sweep import best

        plan = best.find_best(args.workdir, max_members=args.max_ensemble)
        print(best.describe(plan), end="")
        print(f"best: {' + '.join(plan['members'])}; inference plan {args.workdir}/{best.PLAN_NAME} (use it as "
              f"`medseg predict --plan {args.workdir}/{best.PLAN_NAME} --input ... --output ...`)")


def cmd_import(args, overrides) -> None:
    from medseg_jax.errors import MedsegError
    from medseg_jax.transfer import importers

    if args.source == "nnunet":
        if overrides:
            raise MedsegError(f"{overrides[0]}: medseg import nnunet takes its configuration from the nnU-Net plans")
        summary = importers.import_nnunet(args.path, args.out, fold=args.fold, checkpoint_name=args.checkpoint)
        print(f"imported nnU-Net {summary['configuration']} ({summary['model']}, {summary['parameters']:,} "
              f"parameters) into {summary['run']}: patch {tuple(summary['patch_size'])}, spacing "
              f"{tuple(round(v, 3) for v in summary['target_spacing'])} mm; predict with "
              f"`medseg predict --run {summary['run']} --input ... --output ...`")
        return
    from medseg_jax import config as config_lib
    from medseg_jax.experiments.base import get_config as base_config

    if args.config:
        config = config_lib.load_config(args.config, overrides)
    else:
        config = config_lib.apply_overrides(base_config(args.arch), overrides)
    summary = importers.import_monai(args.arch, args.path, args.out, encoder_only=args.encoder_only, config=config,
                                     plans_path=args.plans, in_channels=args.in_channels,
                                     out_channels=args.out_channels)
    what = "encoder" if args.encoder_only else "all weights"
    print(f"imported MONAI {args.arch} ({what}: {', '.join(summary['pretrained'])}; {summary['parameters']:,} "
          f"parameters) into {summary['run']}")
    if not summary["has_plans"]:
        print("no --plans given: the run has no preprocessing plan, so `medseg predict` cannot use it until "
              "plans.json is added (use it to initialise fine-tuning)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="3D medical image segmentation in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write synthetic CT/MRI/US phantoms in Decathlon layout")
    p.add_argument("--out", required=True, help="dataset folder to create (must not exist or be empty)")
    p.add_argument("--modality", choices=["ct", "mri", "us", "us2d"], default="ct")
    p.add_argument("--cases", type=int, default=20, help="training cases (imagesTr/labelsTr)")
    p.add_argument("--test-cases", type=int, default=5, help="test cases (imagesTs, labels in labelsTs)")
    p.add_argument("--unlabelled-cases", type=int, default=0,
                   help="images without labels (imagesUnlabelled, dataset.json's 'unlabelled' list) for pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scanner", default="reference",
                   help="how the images look: a scanner profile of the modality (ct: reference, soft-kernel, low-dose; "
                        "mri: reference, low-field, thick-slice; us: reference, low-gain, coarse), e.g. one per "
                        "simulated site")

    def training_arguments(p):
        p.add_argument("--config", help="experiment file with get_config() (not needed with --resume)")
        p.add_argument("--workdir", required=True, help="run directory (new, or existing with --resume)")
        p.add_argument("--dataset", help="dataset folder; shorthand for --config.data.dataset=DIR")
        p.add_argument("--store", help="prepared store; shorthand for --config.data.store=STORE")
        p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
        p.add_argument("--mesh", help="devices per mesh axis, e.g. data=2,space=4 (shorthand for --config.mesh.*)")
        p.add_argument("--profile", type=int, metavar="N", help="write a jax profiler trace of N steps (after the "
                                                              "first) into RUN/profile/ for TensorBoard or Perfetto")
        p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (with --num-processes, --process-id)")
        p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
        p.add_argument("--process-id", type=int, help="multi-host: this process's index, 0 .. N-1")
        p.add_argument("--distributed", action="store_true",
                       help="multi-host: let jax.distributed.initialize find the cluster (TPU pod slices, ...); "
                            "SLURM (srun) and Open MPI (mpirun) are detected without it")

    p = sub.add_parser("train", help="train a model; extra --config.key=value arguments override the config")
    training_arguments(p)
    p.add_argument("--init-from", help="fine-tune: start from this run's params (trained, made by `medseg import`, "
                                       "or the encoder of a `medseg pretrain` run); without --config its config is "
                                       "used too")

    p = sub.add_parser("pretrain", help="self-supervised pretraining (masked image modelling) on images, labelled or "
                                        "not (`medseg prepare --unlabelled`); fine-tune with `medseg train "
                                        "--init-from`")
    training_arguments(p)

    p = sub.add_parser("federated", help="federated training with Flower across sites (each trains on its own "
                                         "store; Flower's simulation runtime on this machine); extra "
                                         "--config.key=value arguments override the config")
    p.add_argument("--config", required=True, help="experiment file with get_config()")
    p.add_argument("--sites", required=True, help="NAME=STORE,NAME=STORE: each site's prepared store (one plan)")
    p.add_argument("--workdir", required=True, help="the global run directory (sites keep their state in "
                                                    "WORKDIR/sites/NAME); the same command resumes a killed run")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--local-steps", type=int, required=True, help="train steps per site and round")
    p.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam"], default="fedavg")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="fedprox: weight of the proximal term")
    p.add_argument("--server-lr", type=float, default=0.01, help="fedadam: the server's learning rate (eta)")
    p.add_argument("--dp-clip", type=float, default=0.0, help="differential privacy: clip each site's update to "
                                                               "this L2 norm (Flower's client-side fixed clipping)")
    p.add_argument("--dp-noise", type=float, default=0.0, help="differential privacy: Gaussian noise multiplier "
                                                               "(std = Z x clip / sites) on the aggregate")
    p.add_argument("--gpus-per-site", type=float, default=0.0, help="GPUs each simulated site holds while it trains")

    p = sub.add_parser("prepare", help="validate, fingerprint, plan and preprocess a dataset into a zarr3 store; "
                                       "extra --config.data.key=value arguments override the data config")
    p.add_argument("--source", required=True, help="dataset folder (Decathlon or nnU-Net raw layout)")
    p.add_argument("--out", required=True, help="store folder to create (or to finish after an interruption)")
    p.add_argument("--config", help="experiment file whose data section sets the plan (default: planned)")
    p.add_argument("--skip-bad", action="store_true", help="prepare the good cases; report the bad ones in the store")
    p.add_argument("--workers", type=int, default=1, help="processes reading and preprocessing cases")
    p.add_argument("--report", help="also write the validation report (TSV) here when validation fails")
    p.add_argument("--unlabelled", action="store_true",
                   help="a store of images without labels for `medseg pretrain`: dataset.json's 'unlabelled' list "
                        "(or imagesUnlabelled/), or every image of a folder of NIfTI files")
    p.add_argument("--plan-from", metavar="STORE", help="take the plan (spacing, normalisation, channels) of this "
                                                        "labelled store instead of planning: unlabelled images seen "
                                                        "as fine-tuning will see them, or federated sites "
                                                        "preprocessed alike")

    p = sub.add_parser("dataset", help="add corrected or newly annotated cases to a prepared store (a new version; "
                                       "runs keep the version they trained on), or list its versions")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("add", help="validate cases like `medseg prepare`, preprocess them with the store's plan "
                                       "and add them as a new version; existing cases are not rewritten")
    q.add_argument("--store", required=True, help="a store made by `medseg prepare`")
    q.add_argument("--source", help="a dataset folder (dataset.json with the store's labels), or imagesTr/ + "
                                    "labelsTr/ with NIfTI label maps or Slicer .seg.nrrd segmentations (segments "
                                    "matched to the labels by name)")
    q.add_argument("--images", help="instead of --source: a folder of scans (with --labels)")
    q.add_argument("--labels", help="instead of --source: their labels, CASE.nii.gz or CASE.seg.nrrd (e.g. `medseg "
                                    "predict --pre-annotations`'s annotations/ once corrected)")
    q.add_argument("--cases", nargs="+", metavar="CASE", help="add only these case ids of --source")
    q.add_argument("--replace", action="store_true", help="a case id the store holds already is replaced by the "
                                                          "new one in the new version (the old one stays in earlier "
                                                          "versions)")
    q.add_argument("--skip-bad", action="store_true", help="add the good cases and report the bad ones")
    q.add_argument("--workers", type=int, default=1, help="processes reading and preprocessing cases")
    q.add_argument("--report", help="also write the validation report (TSV) here when validation fails")
    q = actions.add_parser("versions", help="what each version of a store added or replaced")
    q.add_argument("--store", required=True, help="a store made by `medseg prepare`")

    p = sub.add_parser("predict", help="segment scans with trained runs, an inference plan or an exported model")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--run", action="append", help="run directory made by `medseg train` or `medseg import`; "
                                                       "repeat for an ensemble (probabilities averaged)")
    models.add_argument("--plan", help="inference plan (SWEEP/inference_plan.json from `medseg results --find-best`):"
                                       " its runs ensembled, its postprocessing applied")
    models.add_argument("--model", help="model folder written by `medseg export` (no model code needed)")
    p.add_argument("--input", required=True, help="a NIfTI file, a folder of them, or DICOM series folder(s)")
    p.add_argument("--output", required=True, help="folder for the predicted label maps (same file names)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--disable-tta", action="store_true", help="no mirror test-time augmentation (8x faster for 3 "
                                                                "axes)")
    tta.add_argument("--mirror-axes", help="patch axes to mirror, e.g. 0,1, even ones training did not mirror "
                                           "(default: each model's infer.mirror_axes among those its augmentation "
                                           "mirrored)")
    p.add_argument("--postprocessing", help="JSON of postprocessing rules, or an inference plan whose rules to apply")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write CASE.npz: per-class probabilities (float16), for `medseg ensemble`")
    p.add_argument("--output-format", choices=["nifti", "dicom-seg"], default="nifti",
                   help="dicom-seg: a DICOM Segmentation referencing each input DICOM series (CASE.dcm)")
    p.add_argument("--pre-annotations", action="store_true",
                   help="also write OUTPUT/annotations: CASE.seg.nrrd (3D Slicer, named and coloured segments), "
                        "CASE_uncertainty.nii.gz (voxel entropy) and labels.txt (ITK-SNAP label descriptions)")
    p.add_argument("--qc", action="store_true",
                   help="also rank the predictions for checking (OUTPUT/qc: entropy, the ensemble's disagreement, "
                        "structure volumes, out-of-distribution scans; `medseg rank` for more views)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --output")
    p.add_argument("--skip-bad", action="store_true", help="predict the good inputs and report the bad ones")
    p.add_argument("--mesh", help="devices per mesh axis for the windows, e.g. data=2 or space=4 (default: the "
                                  "local devices on data)")

    p = sub.add_parser("rank", help="rank scans by how unsure the models are of them (entropy, disagreement of "
                                    "test-time views, structure volumes, out-of-distribution intensities): what to "
                                    "check or annotate first")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--run", action="append", help="run directory; repeat for an ensemble (each model is a view)")
    models.add_argument("--plan", help="inference plan from `medseg results --find-best`: its runs")
    p.add_argument("--input", required=True, help="a NIfTI file, a folder of them, or DICOM series folder(s)")
    p.add_argument("--out", required=True, help="folder for ranking.csv, report.json and montage.png")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--disable-tta", action="store_true", help="no mirrored views (only the ensemble's models)")
    tta.add_argument("--mirror-axes", help="patch axes whose mirrorings are views, e.g. 0,1,2 (default: those each "
                                           "model's training mirrored)")
    p.add_argument("--top", type=int, default=6, help="cases shown in montage.png (default 6)")
    p.add_argument("--ood-threshold", type=float, default=3.0,
                   help="flag (and rank first) scans whose intensities lie this many training spreads away")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ranking in --out")
    p.add_argument("--skip-bad", action="store_true", help="rank the good inputs and report the bad ones")
    p.add_argument("--mesh", help="devices per mesh axis for the windows, e.g. data=2")

    p = sub.add_parser("ensemble", help="average the probabilities saved by `medseg predict --save-probabilities` "
                                        "in several folders into label maps")
    p.add_argument("--input", required=True, nargs="+", help="two or more folders of CASE.npz")
    p.add_argument("--output", required=True, help="folder for the label maps (CASE.nii.gz)")
    p.add_argument("--postprocessing", help="JSON of postprocessing rules, or an inference plan whose rules to apply")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged probabilities")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("export", help="serialise trained runs (jax.export StableHLO) with their preprocessing plan, "
                                      "labels and postprocessing into a folder that predicts without the model code")
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--run", action="append", help="run directory; repeat for an ensemble")
    models.add_argument("--plan", help="inference plan from `medseg results --find-best`")
    p.add_argument("--out", required=True, help="new folder for the exported model")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--platforms", default="cpu,cuda", help="platforms to lower for (default cpu,cuda; also rocm, tpu)")
    p.add_argument("--postprocessing", help="JSON of postprocessing rules (default: the plan's, else none)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    p = sub.add_parser("evaluate", help="Dice, IoU, precision, recall, HD, HD95, ASSD, NSD per case and class; several "
                                         "prediction folders are compared with paired Wilcoxon tests")
    p.add_argument("--pred", required=True, nargs="+", help="folder(s) of predicted label maps")
    p.add_argument("--ref", required=True, help="folder of reference label maps (same file names)")
    p.add_argument("--out", required=True, help="folder for per_case.csv, summary.json, report.md, box plots")
    p.add_argument("--surface", choices=["surfel", "voxel"], default="surfel",
                   help="surface convention: surfel (DeepMind surface-distance, default) or voxel (MONAI)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--workers", type=int, default=1, help="cases evaluated in parallel processes")
    p.add_argument("--dataset-json", help="dataset.json naming the labels (default: beside or above --ref)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="demo-data -> train -> predict -> evaluate on built-in phantoms; extra "
                                     "--config.key=value arguments override the experiment")
    p.add_argument("--out", default="runs/demo", help="output folder (an existing one is moved aside, not overwritten)")
    p.add_argument("--modality", choices=["ct", "mri", "us", "us2d"], default="ct",
                   help="phantoms to train on; each has its own packaged experiment, experiments/demo_<modality>.py")
    p.add_argument("--cases", type=int, help="training phantoms (default 20; us2d: 200 frames)")
    p.add_argument("--test-cases", type=int, help="test phantoms, predicted and evaluated at the end (default 5; "
                                                   "us2d: 20 frames)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms (training has config.seed)")
    p.add_argument("--config", help="experiment file (default: the modality's packaged demo experiment)")

    p = sub.add_parser("plan", help="choose patch size, network topology and batch size for a memory budget by "
                                     "compiling the train step; writes the run's config")
    p.add_argument("--config", required=True, help="experiment file with get_config()")
    p.add_argument("--workdir", required=True, help="run directory to plan (new); then `medseg train --workdir`")
    p.add_argument("--budget-gb", type=float, help="device memory to plan for (default: the model preset's, "
                                                   "ResEnc M/L/XL 8/24/40, else 8)")

    p = sub.add_parser("memory", help="compile the train step for a mesh without running it and print its "
                                       "per-device peak memory as JSON; extra --config.key=value override the config")
    p.add_argument("--config", required=True, help="experiment file with get_config()")
    p.add_argument("--mesh", default="data=1", help="devices per mesh axis, e.g. data=2,space=4 (default data=1)")
    p.add_argument("--classes", type=int, help="output classes incl. background (default: data.store's, else 2)")
    p.add_argument("--channels", type=int, help="input channels (default: data.store's, else 1)")

    p = sub.add_parser("sweep", help="run every trial x fold of a sweep file (cross-validation, ablations), then "
                                      "write its results table; re-running the same command continues it; extra "
                                      "--config.key=value arguments override every trial")
    p.add_argument("sweep", help="sweep file with get_sweep(), or the name of one in experiments/sweeps/")
    p.add_argument("--workdir", required=True, help="sweep folder (manifest, splits, run directories, logs)")
    p.add_argument("--folds", help="folds to run, e.g. 0,1,2,3,4 (default: the sweep file's)")
    p.add_argument("--dataset", help="dataset folder; shorthand for --config.data.dataset=DIR")
    p.add_argument("--executor", choices=["local", "slurm", "submitit-local"], default="local",
                   help="local: subprocesses here; slurm: a submitit job array; submitit-local: the slurm code path "
                        "run here by submitit")
    p.add_argument("--max-parallel", type=int, default=1,
                   help="runs at once (local: GPUs split between them; slurm: the array's parallelism)")
    p.add_argument("--partition", help="slurm: partition (default: the sweep file's slurm settings)")
    p.add_argument("--gpus", type=int, help="slurm: GPUs per job")
    p.add_argument("--time", type=int, help="slurm: time limit per job in minutes")
    p.add_argument("--account", help="slurm: account to charge")

    p = sub.add_parser("results", help="a sweep's cross-validation table: Dice, HD95, NSD from out-of-fold "
                                        "predictions, paired comparisons with the baseline trial, PNG")
    p.add_argument("workdir", help="sweep folder (made by `medseg sweep`)")
    p.add_argument("--out", help="folder for the tables (default: WORKDIR/results)")
    p.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    p.add_argument("--workers", type=int, default=1, help="cases scored in parallel processes")
    p.add_argument("--find-best", action="store_true",
                   help="also choose the best trial or ensemble of trials and the postprocessing that raises the CV "
                        "Dice (nnU-Net's find_best_configuration); writes WORKDIR/inference_plan.json")
    p.add_argument("--max-ensemble", type=int, default=2, help="most trials in an ensemble (default 2)")

    p = sub.add_parser("import", help="turn PyTorch-trained weights (nnU-Net v2, MONAI) into a run directory")
    source = p.add_subparsers(dest="source", required=True)
    q = source.add_parser("nnunet", help="an nnU-Net v2 result folder, fold folder or checkpoint_*.pth")
    q.add_argument("path")
    q.add_argument("--out", required=True, help="run directory to create (must not exist)")
    q.add_argument("--fold", help="fold to import when the result folder has several")
    q.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name inside the fold")
    q = source.add_parser("monai", help="a MONAI state dict (.pt/.pth); extra --config.model.k=v set the "
                                         "architecture (as MONAI's constructor arguments)")
    q.add_argument("--arch", required=True, choices=["unetr", "swin_unetr", "segresnet"])
    q.add_argument("path", help="state dict file")
    q.add_argument("--out", required=True, help="run directory to create (must not exist)")
    q.add_argument("--encoder-only", action="store_true",
                   help="load only the encoder (e.g. MONAI's self-supervised SwinUNETR weights) for fine-tuning")
    q.add_argument("--config", help="experiment file giving the model section and patch size")
    q.add_argument("--plans", help="preprocessing plan for prediction: a store, run directory or plans.json")
    q.add_argument("--in-channels", type=int, help="input channels (without --plans)")
    q.add_argument("--out-channels", type=int, help="output classes incl. background (without --plans)")
    return parser


def show_library_messages() -> None:
    """The library reports progress through `logging` (loggers under "medseg_jax"); the command line shows them on
    stdout as plain lines, and leaves other libraries' loggers alone. Called by every `main()`, so the lines go to
    the stdout of the moment (tests swap it)."""
    logger = logging.getLogger("medseg_jax")
    handlers = [h for h in logger.handlers if getattr(h, "medseg_cli", False)]
    if handlers:
        handlers[0].stream = sys.stdout  # not setStream: it flushes the old stream, which may be closed by now
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.medseg_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    show_library_messages()
    from medseg_jax.errors import MedsegError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "pretrain", "federated", "demo", "prepare", "import", "plan", "memory", "sweep"):
            handler = {"train": cmd_train, "pretrain": cmd_pretrain, "federated": cmd_federated, "demo": cmd_demo,
                       "prepare": cmd_prepare, "import": cmd_import, "plan": cmd_plan, "memory": cmd_memory,
                       "sweep": cmd_sweep}[args.command]
            handler(args, _overrides(unknown, parser))
        else:
            if unknown:
                parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            {"demo-data": cmd_demo_data, "predict": cmd_predict, "evaluate": cmd_evaluate, "rank": cmd_rank,
             "results": cmd_results, "ensemble": cmd_ensemble, "export": cmd_export,
             "dataset": cmd_dataset}[args.command](args)
    except MedsegError as exc:
        print(f"medseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
