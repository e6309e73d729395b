"""Cross-validation and ablation sweeps (`medseg sweep`, `medseg results`).

A sweep file (experiments/sweeps/NAME.py, see medseg_jax/experiments/trials.py) names trials as changes to one base
experiment. `runner.run_sweep` turns each trial x fold into an ordinary run directory (its config.json written
first), launches them through an executor (`executors.py`: subprocesses here, or submitit for SLURM and its local
stand-in), each running `worker.run_trial`, and keeps the manifest `SWEEP_DIR/sweep.json`. `results.py` scores the
out-of-fold predictions and compares trials with a baseline.
"""
