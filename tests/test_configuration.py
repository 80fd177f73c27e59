"""Configuration tests: composite save/load, presets, validation, configs written with the old masking keys."""

import json

import pytest

from clusterstm.models.configuration_clusterstm import (
    PRESETS,
    ClusterSTMConfig,
    ClusterSTMTextConfig,
    ClusterSTMVisionConfig,
)


def test_composite_config_save_load_roundtrip(tmp_path):
    config = ClusterSTMConfig.from_preset("tiny", relevance_window_size=5, relevance_loss="kl")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "clusterstm"
    assert saved["vision_config"]["hidden_size"] == 128
    loaded = ClusterSTMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert isinstance(loaded.vision_config, ClusterSTMVisionConfig)
    assert isinstance(loaded.text_config, ClusterSTMTextConfig)
    assert loaded.relevance_window_size == 5
    assert loaded.relevance_loss == "kl"


def test_sub_config_from_dict_and_defaults():
    config = ClusterSTMConfig(vision_config={"hidden_size": 64, "num_attention_heads": 4}, text_config=None)
    assert config.vision_config.hidden_size == 64
    assert config.text_config.num_fusion_layers == 3  # BERT-base default with 3 fusion layers
    assert config.logit_scale_init_value == pytest.approx(2.6592)


def test_presets():
    tiny = ClusterSTMConfig.from_preset("tiny")
    base = ClusterSTMConfig.from_preset("base")
    assert tiny.vision_config.image_size == 64 and tiny.vision_config.num_frames == 8
    assert tiny.vision_config.patch_size == 8
    assert base.vision_config.image_size == 224 and base.vision_config.patch_size == 16
    assert base.vision_config.num_frames == 4 and base.vision_config.hidden_size == 768
    assert base.text_config.num_hidden_layers == 12 and base.text_config.num_fusion_layers == 3
    assert base.text_config.vocab_size == 30522
    assert set(PRESETS) >= {"tiny", "base"}
    # A preset is just a config: overrides reach top level and sub-configs, and the preset dict is not mutated.
    custom = ClusterSTMConfig.from_preset("tiny", projection_dim=32, vision_config={"num_hidden_layers": 1})
    assert custom.projection_dim == 32 and custom.vision_config.num_hidden_layers == 1
    assert PRESETS["tiny"]["vision_config"]["num_hidden_layers"] != 1
    with pytest.raises(ValueError, match="Unknown preset"):
        ClusterSTMConfig.from_preset("huge")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"relevance_window_size": 2}, "relevance_window_size"),
        ({"relevance_window_size": 0}, "relevance_window_size"),
        ({"relevance_loss": "l1"}, "relevance_loss"),
        ({"relevance_tokens": "some"}, "relevance_tokens"),
        ({"mlm_loss_weight": -1.0}, "mlm_loss_weight"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterSTMConfig.from_preset("tiny", **kwargs)


def test_config_written_with_masking_settings_still_loads_and_ignores_them(tmp_path):
    """Checkpoints written when masking lived in the config (config.json with mask_strategy, mask_ratio, dc_ratio,
    dpc_k, mask_features, mask_at_eval, also inside vision_config) load; the keys influence nothing."""
    reference = ClusterSTMConfig.from_preset("tiny")
    legacy = reference.to_dict()
    old_keys = {
        "mask_strategy": "random",
        "mask_ratio": 0.5,
        "dc_ratio": 0.3,
        "dpc_k": 2,
        "mask_features": "patch",
        "mask_at_eval": True,
    }
    legacy.update(old_keys)
    legacy["vision_config"].update({**old_keys, "mask_strategy": "tube"})
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    loaded = ClusterSTMConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == reference.to_dict()
    for key in old_keys:
        assert not hasattr(loaded, key) and not hasattr(loaded.vision_config, key)
    # Even out-of-range old values (refused before) are accepted: they no longer mean anything.
    assert not hasattr(ClusterSTMVisionConfig(mask_ratio=1.5), "mask_ratio")


def test_vision_config_validation():
    with pytest.raises(Exception, match="not a multiple"):
        ClusterSTMVisionConfig(hidden_size=10, num_attention_heads=3)
