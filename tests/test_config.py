import re
import shutil
import subprocess

import pytest

from mmpretrain.config import ConfigError, load_config, parse_overrides, to_yaml
from mmpretrain.train import main

from conftest import CONFIGS, ROOT


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=100", "model.decoder.layers=2", "data.sources=[a.tar, b.tar]"])
    assert cfg.train.steps == 100 and cfg.model.decoder.layers == 2
    assert [s.pattern for s in cfg.data.sources] == ["a.tar", "b.tar"]
    assert cfg.train.lr == 1e-3  # untouched default


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(to_yaml(cfg))  # what a run writes as runs/<name>/config.yaml
    assert load_config(resolved) == cfg


# each shipped config's warm-up in steps at its own train.steps, as it was when they were counts
SHIPPED_WARMUP = {"text_image_audio": 150, "text_video": 150, "text_image_audio_video": 30, "long_context": 5,
                  "tiny": 0, "recipes/lit": 50, "recipes/frozen_decoder": 30}


def test_a_warm_up_share_scales_with_the_run_and_shipped_configs_run_any_length():
    shipped = sorted(str(p.relative_to(ROOT / "configs").with_suffix("")) for p in (ROOT / "configs").glob("**/*.yaml"))
    assert sorted(SHIPPED_WARMUP) == shipped
    for name, steps in SHIPPED_WARMUP.items():
        path = ROOT / "configs" / f"{name}.yaml"
        assert load_config(path).train.warmup_steps == steps, name
        for n in (2, 3, 60):  # `train.steps=N` alone
            assert load_config(path, [f"train.steps={n}"]).train.warmup_steps < n
    main_job = ROOT / "configs" / "text_image_audio.yaml"
    assert load_config(main_job, ["train.steps=60"]).train.warmup_steps == 22  # 0.375 of 60, rounded down
    assert load_config(None, ["train.steps=100", "train.warmup_steps=0.29"]).train.warmup_steps == 29
    assert load_config(None, ["train.steps=100", "train.warmup_steps=7"]).train.warmup_steps == 7  # a count
    assert [load_config(None, [f"train.steps={n}"]).train.warmup_steps for n in (2, 30, 1000)] == [0, 1, 50]
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: 2\.5; expected a number of steps"):
        load_config(None, ["train.warmup_steps=2.5"])


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


def test_a_key_given_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"^train\.steps: given 2 times \(5, 7\); give each key once$"):
        parse_overrides(["train.steps=5", "train.steps=7"])
    with pytest.raises(ConfigError, match=r"^data\.sources: given 2 times"):  # not next to each other
        parse_overrides(["data.sources=/d/a-1.tar", "train.steps=5", "data.sources=/d/a-2.tar"])


def _bash_words(text: str, cwd, expand: bool = True) -> list[str]:
    """The words bash passes to a command for `text`: with brace expansion and globbing (a glob that
    matches nothing is an error, as in zsh), or (`expand=False`) with quote removal only."""
    options = "shopt -s failglob" if expand else "set -f +B"
    proc = subprocess.run(["bash", "-c", f"{options}; printf '%s\\0' {text}"], cwd=cwd, capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.split("\0")[:-1] if proc.returncode == 0 else [f"bash failed: {proc.stderr.strip()}"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("key,pattern", [
    ("data.sources", "/d/train-{000..127}.tar"),  # the README's single-pattern example, unquoted
    ("data.eval_sources", "/d/eval-{8..12}.tar"),
    ("data.sources", "/d/{laion,cc12m}-000.tar"),
    ("data.sources", "[/d/a-{00..10..2}.tar]"),
])
def test_a_brace_pattern_the_shell_expanded_says_to_quote_it(key, pattern, tmp_path, capsys):
    words = _bash_words(f"{key}={pattern}", tmp_path)  # what bash makes of it unquoted
    assert len(words) > 1
    assert _bash_words(f"{key}='{pattern}'", tmp_path) == [f"{key}={pattern}"]  # quoted: one word
    code = main([str(ROOT / "configs" / "tiny.yaml"), *words, "--print-config"])
    err = capsys.readouterr().err
    _assert_one_clear_line(code, err, f"{key}: given {len(words)} times")
    assert f"quote it: {key}='{pattern}'" in err


def _readme_commands() -> list[str]:
    """The README's shell lines (```bash blocks, `&&` split) and its inline `key.path=value` examples."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    inline = [c for c in re.findall(r"`([^`]+)`", prose) if re.search(r"\w\.\w+=", c)]
    return [part for line in lines + inline for part in line.split(" && ")]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_readme_examples_work_pasted_into_bash(tmp_path):
    """Patterns with braces or brackets are quoted: bash passes every word as it is written."""
    commands = _readme_commands()
    assert any("data.sources=" in c for c in commands)
    for command in commands:
        assert _bash_words(command, tmp_path) == _bash_words(command, tmp_path, expand=False), command


def test_a_config_path_that_is_not_a_yaml_text_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path), "--print-config"]) == 2
    _assert_one_clear_line(2, capsys.readouterr().err, f"{tmp_path}: a directory; expected a YAML file")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"train:\n  steps: 3\n\xff\xfe\x00\x01")
    code = main([str(binary), "--print-config"])
    _assert_one_clear_line(code, capsys.readouterr().err, f"{binary}: not UTF-8 text (byte 0xff on line 3)")


def test_a_model_too_large_for_this_machine_is_refused_with_the_estimate(tmp_path, capsys):
    """Refused from the config's sizes before anything is allocated or read (no data is needed)."""
    code = main([str(ROOT / "configs" / "tiny.yaml"), f"run.dir={tmp_path}", "train.device=cpu",
                 f"data.demo.cache_dir={tmp_path / 'no-demo'}", "model.image.width=1000000000"])
    err = capsys.readouterr().err
    _assert_one_clear_line(code, err, "GB")
    assert re.search(r"over [\d,.]+ GB.* more than the [\d,.]+ GB of memory", err), err
    assert not (tmp_path / "no-demo").exists()
    code = main([str(ROOT / "configs" / "tiny.yaml"), f"run.dir={tmp_path}", "train.device=cpu",
                 f"data.demo.cache_dir={tmp_path / 'no-demo'}", "model.image.width=1000000"])
    err = capsys.readouterr().err
    _assert_one_clear_line(code, err, "model: 24,000,161,627,904 parameters")  # counted on the meta device
    assert re.search(r"need [\d,.]+ GB .* more than the [\d,.]+ GB of memory", err), err
    assert "model.image.width=1000000 makes it this large (at its default, 128, the model has" in err


def test_a_diverging_run_stops_with_one_line_naming_the_terms_and_the_learning_rate(tiny_cfg, tmp_path, capsys):
    code = main([str(ROOT / "configs" / "tiny.yaml"), f"data.demo.cache_dir={tiny_cfg().data.demo.cache_dir}",
                 f"run.dir={tmp_path}", "train.device=cpu", "data.num_workers=0", "train.lr=1.0e+300"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: non-finite loss at step 2 in ") and "next_token (nan)" in line, line
    assert "the weights diverged: likely train.lr=1e+300 is too high" in line


def test_cli_print_config_and_error(capsys):
    assert main([str(ROOT / "configs" / "tiny.yaml"), "train.steps=7", "--print-config"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main([str(ROOT / "configs" / "tiny.yaml"), "train.step=7"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err


# --------------------------------------------------------------------------- every bad config


def _schema_cases() -> list[tuple[list[str], str]]:
    """From the schema itself: for every scalar field, a value of the wrong type, a YAML syntax
    error, and for floats NaN and infinities; every bounded field just past its bound."""
    import dataclasses
    import typing

    from mmpretrain.config import Config, ModelConfig
    from mmpretrain.encoders import MODALITIES

    cases = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}{f.name}", hints[f.name]
            if cls is ModelConfig and f.name == "sections":  # model.image, model.audio, ...
                for name, spec in MODALITIES.items():
                    walk(spec.config, f"{prefix}{name}.")
                continue
            if dataclasses.is_dataclass(tp):
                walk(tp, key + ".")
                continue
            cases.append(([f"{key}=[1"], key))  # unterminated flow list
            if tp in (int, float):
                cases.append(([f"{key}=abc"], key))
            if tp is float:
                cases.extend([([f"{key}=.nan"], key), ([f"{key}=.inf"], key), ([f"{key}=-.inf"], key)])
            if tp is bool:
                cases.append(([f"{key}=maybe"], key))
            if typing.get_origin(tp) is typing.Literal:
                cases.append(([f"{key}=bogus"], key))
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if lo is not None:
                cases.append(([f"{key}={lo - 1}"], key))
            if hi is not None:
                cases.append(([f"{key}={hi + 1}"], key))
            if f.metadata.get("nonempty"):
                cases.append(([f"{key}="], key))

    walk(Config, "")
    return cases


CROSS_FIELD = [
    (["model.decoder.width=30", "model.decoder.heads=4"], "model.decoder.heads"),
    (["model.decoder.width=20", "model.decoder.heads=4"], "model.decoder.heads"),  # odd head size
    (["model.image.width=31"], "model.image.heads"),
    (["model.audio.width=31"], "model.audio.heads"),
    (["model.audio.heads=5"], "model.audio.heads"),
    (["model.fusion.heads=3"], "model.fusion.heads"),
    (["model.image.image_size=30"], "model.image.patch_size"),
    (["model.audio.n_mels=30"], "model.audio.patch_freq"),
    (["model.audio.clip_seconds=0.1", "model.audio.patch_time=20"], "model.audio.clip_seconds"),
    (["model.audio.hop_ms=0.01"], "model.audio.hop_ms"),
    (["model.modalities=[image, image]"], "model.modalities"),
    (["model.modalities=[]"], "model.modalities"),
    (["model.modalities=[image, smell]"], "model.modalities[1]"),
    (["model.image.std=[0.5, 0.5]"], "model.image.std: [0.5, 0.5]"),  # the key given, not mean/std
    (["model.image.std=[0.5, 0.0, 0.5]"], "model.image.std: [0.5, 0.0, 0.5]"),
    (["model.image.mean=[0.5]"], "model.image.mean: [0.5]"),
    (["model.modalities=[video]", "model.video.std=[1, -1, 1]"], "model.video.std: [1.0, -1.0, 1.0]"),
    (["model.modalities=[video]", "model.video.mean=[0, 0]"], "model.video.mean: [0.0, 0.0]"),
    (["model.image.std=[.inf, 0.5, 0.5]"], "model.image.std[0]"),
    (["parallel.sp=3"], "parallel.sp"),
    (["objectives.contrastive_weight=0", "objectives.next_token_weight=0"], "objectives"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.betas=[0.9, 1.0]"], "train.betas"),
    (["train.betas=[0.9, .nan]"], "train.betas[1]"),
    (["train.betas=0.9"], "train.betas"),
    (["train.steps=10", "train.warmup_steps=10"], "train.warmup_steps: 10 is not below train.steps=10"),
    (["train.steps=5", "train.warmup_steps=50"], "train.warmup_steps: 50 is not below train.steps=5"),
    ([".steps=5"], "override '.steps=5': an empty key in the path"),
    (["train..steps=5"], "override 'train..steps=5': an empty key in the path"),
    (["train.steps.=5"], "override 'train.steps.=5': an empty key in the path"),
    (["data.max_tokens=10"], "data.max_tokens"),
    (["data.sources=[]"], "data.sources"),
    (["data.sources=[{pattern: a.tar, weight: 0}]"], "data.sources"),
    (["data.sources=[{pattern: a.tar, weight: -1}]"], "data.sources[0].weight"),
    (["data.sources=[{pattern: a.tar, wieght: 1}]"], "data.sources[0].wieght"),
    (["data.sources=[a.tar, {pattern: b.tar, name: a.tar}]"], "data.sources"),
    (["data.eval_sources=[]"], "data.eval_sources"),
    (["data.caption_keys=[]"], "data.caption_keys"),
    (["data.caption_keys=[json:]"], "data.caption_keys"),
    (["train.steps=1.5"], "train.steps"),
    (["train.lr=1e-3x"], "train.lr"),
    (["model.decoder=5"], "model.decoder"),
    (["train.steps.value=5"], "train.steps"),
    (["trian.steps=5"], "trian"),
    (["run.name='abc"], "run.name"),
    (["train.steps={a: 1"], "train.steps"),
    (["run.seed=99999999999999999999999"], "run.seed"),  # past the 64 bits torch's generators take
    (["model.audio.n_mels=100000000"], "model.audio.n_mels"),  # a filterbank of 100 GB, not a parameter
    (["model.audio.win_ms=800"], "model.audio.win_ms"),  # an FFT longer than twice the clip
]

RUNTIME = [  # found past the schema: data, environment, checkpoint
    (["data.sources=[/nowhere/train-{000000..000127}.tar]"], "data.sources"),
    (["data.sources=/nowhere/one.tar"], "data.sources"),
    (["data.eval_sources=[/nowhere/eval.tar]"], "data.eval_sources"),
    (["data.sources=['']"], "data.sources"),
    (["train.device=cuda"], "train.device"),
    (["model.attention.backend=xformers"], "model.attention.backend"),
    (["model.attention.backend=varlen"], "model.attention.backend"),
    (["train.resume=latest"], "train.resume"),
    (["train.resume=/nowhere/step_00000001"], "train.resume"),
    (["data.sources=[demo-docs]", "objectives.next_token_weight=0"], "nothing would train"),  # documents only
]


def _assert_one_clear_line(code, err, key):
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith("config error:")]
    assert len(lines) == 1 and key in lines[0], err[-2000:]


@pytest.mark.parametrize("overrides,key", _schema_cases() + CROSS_FIELD,
                         ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_every_bad_override_is_one_clear_line(overrides, key, capsys):
    code = main([str(ROOT / "configs" / "tiny.yaml"), *overrides, "--print-config"])
    _assert_one_clear_line(code, capsys.readouterr().err, key)


@pytest.mark.parametrize("overrides,key", RUNTIME, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_data_environment_and_resume_mistakes_stop_before_training(overrides, key, tiny_cfg, capsys, tmp_path):
    if "train.device=cuda" in overrides and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main([str(ROOT / "configs" / "tiny.yaml"), f"data.demo.cache_dir={tiny_cfg().data.demo.cache_dir}",
                 f"run.dir={tmp_path}", "train.device=cpu", *overrides])
    _assert_one_clear_line(code, capsys.readouterr().err, key)
    assert not list(tmp_path.glob("*/metrics.jsonl"))  # no step was taken


BAD_FILES = [
    ("[]\n", "top level must be a mapping"), ("0\n", "top level must be a mapping"),
    ("false\n", "top level must be a mapping"), ("''\n", "top level must be a mapping"),
    ("train:\n  steps: 3\n  steps: 4\n", "line 3"), ("train: {steps: 3\n", "line 2"),
    ("train:\n  steps: 3\n   lr: 1\n", "line 3"), ("train:\n\tsteps: 3\n", "line 2"),
    ("train: [1, 2]\n", "train"), ("train:\n  steps: .nan\n", "train.steps"),
    ("!!python/object/apply:os.system ['echo hi']\n", "line 1"),
]


@pytest.mark.parametrize("text,where", BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_every_bad_yaml_file_is_one_clear_line(text, where, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code = main([str(path), "--print-config"])
    _assert_one_clear_line(code, capsys.readouterr().err, where)


def test_there_are_over_a_hundred_bad_inputs():
    assert len(_schema_cases()) + len(CROSS_FIELD) + len(RUNTIME) + len(BAD_FILES) >= 100


def test_numbers_patterns_and_single_values_as_users_write_them():
    cfg = load_config(None, ["train.lr=1e-4", "objectives.init_temperature=7E-2",
                             "data.sources=[/data/train-{000000..000127}.tar]",  # the README's example
                             "data.eval_sources=/data/eval-{000..003}.tar"])
    assert cfg.train.lr == 1e-4 and cfg.objectives.init_temperature == 0.07
    assert [s.pattern for s in cfg.data.sources] == ["/data/train-{000000..000127}.tar"]
    assert cfg.data.eval_sources == ["/data/eval-{000..003}.tar"]
    assert [s.pattern for s in load_config(None, ["data.sources=[a-{0..1}.tar, 'b-{2..3}.tar']"]).data.sources] == \
        ["a-{0..1}.tar", "b-{2..3}.tar"]
    # only true/false are booleans: `on`/`off` are the strings the compile switch takes
    assert load_config(None, ["parallel.compile=on"]).parallel.compile == "on"
    assert load_config(None, ["parallel.compile=off"]).parallel.compile == "off"
    with pytest.raises(ConfigError, match="train.progress: expected bool, got 'yes'"):
        load_config(None, ["train.progress=yes"])
    mixed = load_config(None, ["data.sources=[{pattern: a.tar, weight: 0.7, name: a}, b.tar]"]).data.sources
    assert [(s.label, s.weight) for s in mixed] == [("a", 0.7), ("b.tar", 1.0)]


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(tiny_cfg, capsys):
    from mmpretrain import train

    cfg = tiny_cfg("train.steps=1", "run.name=arch")
    train.run(cfg)
    args = [str(ROOT / "configs" / "tiny.yaml"), f"data.demo.cache_dir={cfg.data.demo.cache_dir}",
            f"run.dir={cfg.run.dir}", "run.name=arch", "train.device=cpu", "train.steps=2"]
    assert main(args + ["model.decoder.width=64"]) == 2
    err = capsys.readouterr().err
    _assert_one_clear_line(2, err, "train.resume")
    assert "shape: " in err and "decoder" in err


def test_resuming_past_the_last_step_says_so(tiny_cfg, caplog):
    from mmpretrain import train

    cfg = tiny_cfg("train.steps=2", "run.name=done")
    train.run(cfg)
    with caplog.at_level("WARNING"):
        train.run(tiny_cfg("train.steps=1", "run.name=done"))
    assert any("at or past train.steps=1: nothing to train" in r.message for r in caplog.records)
