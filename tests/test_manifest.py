"""The run manifest: which changed settings are refused, allowed or only listed."""
import json

import pytest

from engine import manifest
from engine.config import Config, ConfigError


def _settings(**changes):
    out = manifest.describe(Config(), label_names=["a", "b"], replicas=1, workers=1)
    out.update(changes)
    return out


def test_unchanged_settings_give_no_lines():
    assert manifest.check(_settings(), _settings(), allow_changed=(), model_dir="m") == ([], [])


def test_harmless_changes_are_listed_and_accepted():
    lines, allowed = manifest.check(_settings(), _settings(epochs=20, learning_rate=0.1, seed=3),
                                    allow_changed=(), model_dir="m")
    assert allowed == []
    assert lines[0] == "settings changed since m/manifest.json was written:"
    assert "  --epochs: 12 -> 20 (the schedule's length changes with it)" in lines
    assert "  --learning_rate: 0.001 -> 0.1" in lines
    assert any(l.startswith("  --seed: 0 -> 3 (the rest of this epoch") for l in lines)


def test_a_changed_calibration_is_listed_as_without_effect_on_resume():
    lines, allowed = manifest.check(_settings(), _settings(calibrate_bn_steps=0),
                                    allow_changed=(), model_dir="m")
    assert allowed == []
    assert lines[1].startswith("  --calibrate_bn_steps: -1 -> 0 (no effect on resume: BN ")


@pytest.mark.parametrize("flag,old,new", [("optimizer", "adam", "sgd"),
                                          ("labels", ["a", "b"], ["b", "a"]),
                                          ("input_size", 32, 48), ("batch_size", 32, 16)])
def test_changes_of_meaning_are_refused_unless_allowed(flag, old, new):
    with pytest.raises(ConfigError, match=f"--{flag} .* -> .*--allow_changed={flag}"):
        manifest.check(_settings(**{flag: old}), _settings(**{flag: new}), allow_changed=(),
                       model_dir="m")
    lines, allowed = manifest.check(_settings(**{flag: old}), _settings(**{flag: new}),
                                    allow_changed=(flag,), model_dir="m")
    assert allowed == [flag] and "(allowed: " in lines[1]


def test_another_architecture_cannot_be_allowed():
    with pytest.raises(ConfigError, match="--backbone changed from tiny_cnn to resnet50"):
        manifest.check(_settings(), _settings(backbone="resnet50"), allow_changed=("optimizer",),
                       model_dir="m")


def test_write_then_read_round_trips_and_a_garbled_file_is_an_error_naming_it(tmp_path):
    manifest.write(str(tmp_path), _settings())
    assert manifest.read(str(tmp_path)) == json.loads(json.dumps(_settings()))
    assert manifest.read(str(tmp_path / "none")) is None
    (tmp_path / "manifest.json").write_text("{garbled")
    with pytest.raises(ConfigError, match="manifest.json is unreadable"):
        manifest.read(str(tmp_path))


def test_layer_lr_decay_and_the_schedule_are_recorded_listed_and_absent_means_the_old_default():
    settings = _settings()
    assert settings["layer_lr_decay"] == 1.0 and settings["unfreeze_schedule"] == ""
    older = {k: v for k, v in settings.items() if k not in ("layer_lr_decay", "unfreeze_schedule")}
    assert manifest.check(older, settings, allow_changed=(), model_dir="m") == ([], [])
    lines, allowed = manifest.check(
        older, _settings(layer_lr_decay=0.8, unfreeze_schedule="2:blocks:1,4:all"),
        allow_changed=(), model_dir="m")
    assert allowed == []  # accepted: slots of groups that did not exist start fresh
    assert any(l.startswith("  --layer_lr_decay: 1.0 -> 0.8 (the backbone blocks' learning "
                            "rates change") for l in lines)
    assert any(l.startswith("  --unfreeze_schedule:  -> 2:blocks:1,4:all (the phases follow")
               for l in lines)
