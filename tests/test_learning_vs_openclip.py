"""benchmarks/learning_vs_openclip.py: open_clip is given ours' optimizer settings, overrides included,
so a change of the shipped defaults cannot leave the two sides training differently."""

from mmpretrain.config import load_config

from conftest import benchmark

bench = benchmark("learning_vs_openclip")


def flag(flags: list[str], name: str) -> float:
    return float(flags[flags.index(name) + 1])


def test_open_clip_trains_with_ours_schedule_and_optimizer():
    t = load_config(bench.CONFIG).train
    flags = bench.optimizer_flags([])
    assert [flag(flags, f) for f in ("--lr", "--warmup", "--wd", "--beta1", "--beta2")] == \
        [t.lr, t.warmup_steps, t.weight_decay, *t.betas]
    overridden = bench.optimizer_flags(["train.warmup_steps=7", "train.lr=5e-4"])
    assert flag(overridden, "--warmup") == 7 and flag(overridden, "--lr") == 5e-4
    assert flag(bench.optimizer_flags(["train.steps=60"]), "--warmup") == 22  # the config's share of 60 steps
