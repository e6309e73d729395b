import pytest

from medseg_jax.config import apply_overrides, load_config
from medseg_jax.errors import MedsegError
from tests.conftest import REPO

DEMO = REPO / "experiments" / "demo_ct.py"


def test_overrides_parse_to_the_field_type():
    config = load_config(DEMO, ["--config.train.steps=7", "--config.train.patch_size=32,32,16",
                                "--config.loss.batch_dice=true", "--config.train.learning_rate=1e-4",
                                "--config.model.strides=((1,1,1),(2,2,1))"])
    assert config.train.steps == 7
    assert tuple(config.train.patch_size) == (32, 32, 16)
    assert config.loss.batch_dice is True
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.model.strides == ((1, 1, 1), (2, 2, 1))


@pytest.mark.parametrize("override", ["--config.train.stepz=3", "--config.nope=1", "--config.train.steps.x=1"])
def test_unknown_key_is_an_error_naming_it(override):
    with pytest.raises(MedsegError, match="unknown config key"):
        load_config(DEMO, [override])


def test_bad_value_type_is_an_error():
    with pytest.raises(MedsegError, match="train.steps"):
        load_config(DEMO, ["--config.train.steps=many"])


def test_overrides_do_not_mutate_the_original():
    config = load_config(DEMO)
    apply_overrides(config, ["--config.train.steps=1"])
    assert config.train.steps != 1


def test_missing_config_file(tmp_path):
    with pytest.raises(MedsegError, match="not found"):
        load_config(tmp_path / "nope.py")
