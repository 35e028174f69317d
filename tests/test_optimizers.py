"""Every optimizer name ED2 configs use builds and takes a step; per-model settings reach their groups."""

import pytest
import torch

from optimizer.optimizers import OPTIMIZERS, build_optimizer, model_param_groups
from tests.conftest import DEMO_DATA
from utils.config import ConfigError, load_config


def config_for(**values):
    return load_config(None, {"data_root": str(DEMO_DATA), **values})


def two_models():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_steps(name):
    unet, text_encoder = two_models()
    config = config_for(optimizer=name)
    optimizer = build_optimizer(config, model_param_groups(config, unet, text_encoder))
    for group in optimizer.param_groups:
        group["lr"] = 1e-3 if "dadapt" not in name and "prodigy" not in name and "dowg" not in name else 1.0
    before = unet.weight.detach().clone()
    (unet(torch.ones(1, 4)).sum() + text_encoder(torch.ones(1, 4)).sum()).backward()
    optimizer.step()
    assert not torch.equal(before, unet.weight), f"{name} did not update the weights"


def test_text_encoder_settings_go_to_its_group():
    unet, text_encoder = two_models()
    config = config_for(
        optimizer="adamw", weight_decay=0.01, text_encoder_weight_decay=0.0, text_encoder_betas=[0.8, 0.99]
    )
    groups = {
        g["name"]: g for g in build_optimizer(config, model_param_groups(config, unet, text_encoder)).param_groups
    }
    assert groups["unet"]["weight_decay"] == 0.01 and groups["text_encoder"]["weight_decay"] == 0.0
    assert groups["unet"]["betas"] == (0.9, 0.999) and groups["text_encoder"]["betas"] == (0.8, 0.99)


def test_frozen_models_have_no_group():
    unet, text_encoder = two_models()
    config = config_for(disable_textenc_training=True)
    assert [g["name"] for g in model_param_groups(config, unet, text_encoder)] == ["unet"]


def test_unknown_optimizer_argument_is_refused():
    unet, text_encoder = two_models()
    config = config_for(optimizer="prodigy", optimizer_args={"d0": 1e-6, "growth_rat": 2})
    with pytest.raises(ConfigError, match="optimizer_args.*'growth_rat'.*growth_rate"):
        build_optimizer(config, model_param_groups(config, unet, text_encoder))


def test_adacoor_and_unknown_names_are_errors_not_adamw8bit():
    with pytest.raises(ConfigError, match="adacoor is EveryDream2's own optimizer"):
        config_for(optimizer="adacoor")
    with pytest.raises(ConfigError, match="scalar_dowg.*use coordinate_dowg"):
        config_for(optimizer="scalar_dowg")
    with pytest.raises(ConfigError, match="did you mean 'adamw8bit'"):
        config_for(optimizer="adamw8bt")
