"""The README's "Train on your own dataset" block runs as written: on generated CT phantoms in Decathlon layout, with
the copied template edited down to a tiny network and a few steps (the edit the README asks the user to make)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TINY_EDIT = '''

_template = get_config


def get_config():  # tests/test_readme.py: the template, made small enough for a CPU test
    from medseg_jax.augment.pipeline import augment_config

    config = _template()
    config.data.target_spacing = (6.0, 6.0, 6.0)
    config.data.val_cases = 1
    config.model.features = (4, 8)
    config.model.strides = ((1, 1, 1), (2, 2, 2))
    config.model.kernel_sizes = ((3, 3, 3), (3, 3, 3))
    config.augment = augment_config("none")
    config.train.patch_size = (16, 16, 16)
    config.train.steps = 2
    config.train.val_every = 2
    config.train.checkpoint_every = 1
    config.train.log_every = 1
    return config
'''


def readme_block(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_train_on_your_own_dataset_runs_as_written(tmp_path):
    lines = readme_block("## Train on your own dataset")
    assert lines[0] == "source .venv/bin/activate" and lines[1].startswith("DATA=")
    assert lines[2].startswith("cp experiments/msd_liver.py experiments/my_task.py")
    work = tmp_path / "work"
    shutil.copytree(REPO / "medseg_jax" / "experiments", work / "experiments",
                    ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    data = tmp_path / "Task03_Phantoms"
    made = subprocess.run(["medseg", "demo-data", "--out", str(data), "--cases", "3", "--test-cases", "1"],
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]

    def run(line: str):
        result = subprocess.run(["bash", "-c", f"DATA={data}\n{line}"], cwd=work, env=env, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    run(lines[2])  # the copy; then the edit the README asks for
    with open(work / "experiments" / "my_task.py", "a") as f:
        f.write(TINY_EDIT)
    for line in lines[3:]:
        run(line)
    assert len(list((work / "runs" / "my_task" / "predictions").glob("*.nii.gz"))) == 1
    assert (work / "runs" / "my_task" / "evaluation" / "summary.json").is_file()
