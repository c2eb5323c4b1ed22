import pytest

from mmpretrain.config import ConfigError, load_config, parse_overrides, to_yaml
from mmpretrain.train import main

from conftest import CONFIGS, ROOT


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=50", "model.decoder.layers=2", "data.sources=[a.tar, b.tar]"])
    assert cfg.train.steps == 50 and cfg.model.decoder.layers == 2
    assert cfg.data.sources == ["a.tar", "b.tar"]
    assert cfg.train.lr == 1e-3  # untouched default


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(cfg))  # what a run writes as runs/<name>/config.yaml
    assert load_config(resolved) == cfg


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key; did you mean 'steps'\?"):
        load_config(None, ["train.stpes=5"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"modle: unknown key; did you mean 'model'"):
        load_config(None, ["modle.decoder.layers=2"])


def test_wrong_type_names_path_value_and_type():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many' \(str\)"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got True"):
        load_config(None, ["train.lr=true"])


def test_bad_value_out_of_range_and_choices():
    with pytest.raises(ConfigError, match=r"train\.batch_size: 0 is out of range; expected a value >= 1"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"model\.attention\.backend: 'flash' is not allowed; expected one of"):
        load_config(None, ["model.attention.backend=flash"])
    with pytest.raises(ConfigError, match=r"model\.modalities\[1\]: 'smell' is not allowed"):
        load_config(None, ["model.modalities=[image, smell]"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"train\.warmup: unknown key; did you mean 'warmup_steps'"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):  # safe_load only
        load_config(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_overrides(["train.steps"])


def test_cli_print_config_and_error(capsys):
    assert main([str(ROOT / "configs" / "tiny.yaml"), "train.steps=7", "--print-config"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main([str(ROOT / "configs" / "tiny.yaml"), "train.step=7"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
