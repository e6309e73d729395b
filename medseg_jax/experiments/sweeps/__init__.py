"""Sweep files for `medseg sweep` (each defines get_sweep(); see medseg_jax/experiments/trials.py)."""
