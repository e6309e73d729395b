"""Experiment configs, installed as `medseg_jax.experiments` (so `medseg demo` and the library find them after a plain
`pip install .`).

`base.py` holds every key with its default (nnU-Net-like settings for a real 3D task); every other file starts from it
and states only what differs. A file of your own can live anywhere and import the base the same way:

    from medseg_jax.experiments import base

    def get_config():
        config = base.get_config()
        config.data.target_spacing = (0.8, 0.8, 1.5)
        return config
"""
