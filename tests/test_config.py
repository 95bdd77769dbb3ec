import pytest

from capi_lab.config import CAPIConfig, ConfigError, MaskConfig, ModelConfig, get_preset, with_overrides


def test_round_trip_through_dict():
    cfg = get_preset("vit_b16")
    again = CAPIConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_yaml_style_values_are_coerced():
    d = get_preset("tiny").to_dict()
    d["optim"]["lr"] = "1e-3"  # YAML 1.1 reads this as a string
    d["optim"]["weight_decay"] = 0
    d["optim"]["betas"] = [0.9, 0.99]
    cfg = CAPIConfig.from_dict(d)
    assert cfg.optim.lr == 1e-3 and cfg.optim.betas == (0.9, 0.99) and isinstance(cfg.optim.weight_decay, float)


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match="mask.ratio"):
        MaskConfig(ratio=1.5)
    with pytest.raises(ConfigError, match="num_registers must be a multiple of 4"):
        ModelConfig(num_registers=6)
    with pytest.raises(ConfigError, match="image_size=30 is not a multiple of model.patch_size=4; use e.g. 28"):
        with_overrides(get_preset("tiny"), image_size=30)
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['mask.ratioo'\]"):
        CAPIConfig.from_dict({"mask": {"ratioo": 0.5}})
    with pytest.raises(ConfigError, match="optim.lr must be a number"):
        CAPIConfig.from_dict({"optim": {"lr": "fast"}})


def test_overrides_by_path_and_shorthand():
    cfg = with_overrides(get_preset("tiny"), **{"optim.lr": 0.5, "embed_dim": 64, "mask.strategy": "block"})
    assert cfg.optim.lr == 0.5 and cfg.model.embed_dim == 64 and cfg.mask.strategy == "block"
    assert get_preset("tiny").model.embed_dim == 128  # presets are fresh copies
