"""Look at shards before training on them.

    python -m mmpretrain.data.inspect '/data/train-{000000..000127}.tar' [--config cfg.yaml] [key=value ...]

Reads every sample with the same parser training uses (the config's modalities,
`data.caption_keys`, decode limits) and prints: samples per shard and in total,
the layouts found (member extensions per sample), the modalities present, the
samples training would skip by reason (the reasons training counts), and caption
length statistics in tokens (with how many the context length truncates). So a
dropped third of a corpus shows here, not as a counter after a day of training.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

from mmpretrain.config import ConfigError, load_config


def inspect(urls: list[str], cfg, progress: bool = True) -> dict:
    import webdataset as wds
    from tqdm.auto import tqdm

    from mmpretrain.data.samples import BadSample, SampleParser, SkipCounter, describe
    from mmpretrain.tokenizer import Tokenizer

    tokenizer = Tokenizer(cfg.model.text)
    parser = SampleParser(cfg, train=False, tokenizer=tokenizer)
    shards, layouts, modalities = {}, collections.Counter(), collections.Counter()
    skips = SkipCounter(max_logs=0, keep=True)  # the counter training uses, listing instead of logging
    lengths, truncated, documents = [], 0, 0
    for url in tqdm(urls, desc="shards", unit="shard", disable=not progress):
        count = 0
        samples = wds.tarfile_to_samples(handler=lambda e: skips("bad_tar", describe(e), shard=url))
        for raw in samples(iter([{"url": url}])):
            count += 1
            layouts[" + ".join(sorted(k for k in raw if not k.startswith("__")))] += 1
            try:
                sample = parser(raw, None)
            except BadSample as e:
                skips(e.reason, e.detail, raw)
                continue
            if "document" in sample:
                documents += 1
                continue
            modalities.update(m for m in parser.specs if m in sample)
            lengths.append(sample["length"])
            truncated += len(tokenizer.encode(sample["captions"][0])) + 2 > tokenizer.context_length
        shards[url] = count
    total, skipped = sum(shards.values()), skips.total
    # a cut tar raises twice (the member, then the archive): one entry per shard and error
    bad = list({(b["shard"], b["key"], b["reason"], b["detail"]): b for b in skips.bad}.values())
    report = {"shards": shards, "samples": total, "layouts": dict(layouts.most_common()),
              "modalities": dict(modalities), "documents": documents, "skipped": dict(skipped),
              "usable": total - sum(v for k, v in skipped.items() if k != "bad_tar"), "bad": bad}
    if lengths:
        report["caption_tokens"] = {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths),
                                    "truncated_at_context_length": int(truncated)}
    return report


def format_report(r: dict) -> str:
    lines = [f"{'shard':<60}{'samples':>10}"]
    lines += [f"{url[-60:]:<60}{n:>10}" for url, n in r["shards"].items()]
    lines += [f"{'total':<60}{r['samples']:>10}", "", "layouts (members per sample):"]
    lines += [f"  {n:>8}  {layout}" for layout, n in r["layouts"].items()]
    lines += ["", "modalities: " + (", ".join(f"{m} {n}" for m, n in r["modalities"].items()) or "none"),
              f"interleaved documents: {r['documents']}"]
    lines += [""] + skip_lines(r)
    if "caption_tokens" in r:
        c = r["caption_tokens"]
        lines += ["", f"caption tokens (sot and eot included): min {c['min']}, median {c['median']}, max {c['max']}; "
                      f"{c['truncated_at_context_length']} cut at model.text.context_length"]
    return "\n".join(lines)


def skip_lines(r: dict, shown: int = 20) -> list[str]:
    """Shards with tar errors (each with its first error), then the samples training would skip."""
    bad_shards = {}
    for b in r["bad"]:
        if b["reason"] == "bad_tar":
            bad_shards.setdefault(b["shard"], b["detail"])
    lines = []
    if bad_shards:
        lines += [f"{len(bad_shards)} shard(s) with tar errors (training reads each up to its error):"]
        lines += [f"  {shard}: {detail}" for shard, detail in list(bad_shards.items())[:shown]]
        lines += [f"  ... {len(bad_shards) - shown} more (--list-bad)"] if len(bad_shards) > shown else []
    skipped = {k: v for k, v in r["skipped"].items() if k != "bad_tar"}
    n = sum(skipped.values())
    if not r["samples"]:
        return lines + ["no sample could be read"]
    if not n:
        return lines + [f"training would skip none of the {r['samples']} sample(s) read"]
    lines += [f"training would skip {n} of {r['samples']} sample(s) ({n / r['samples']:.1%}):"]
    return lines + [f"  {count:>8}  {reason}" for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1])]


def format_bad(r: dict) -> str:
    """Every bad sample (shard, key, reason, detail) and shard (key "-"), one a line."""
    return "\n".join([f"bad samples and shards: {len(r['bad'])}"] +
                     [f"  {b['shard']}  {b['key'] or '-'}  {b['reason']}: {b['detail']}" for b in r["bad"]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmpretrain.data.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", help="shard pattern (brace expansion)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.modalities=[audio]")
    p.add_argument("--config", default=None, help="the training config to parse with (default: built-in)")
    p.add_argument("--json", default=None, help="also write the report as JSON here (bad samples in 'bad')")
    p.add_argument("--list-bad", action="store_true", help="also list every bad sample (shard, key, reason)")
    args = p.parse_args(argv)
    try:
        from mmpretrain.data.sources import expand

        cfg = load_config(args.config, args.overrides)
        urls = expand([args.pattern], "pattern")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = inspect(urls, cfg, progress=sys.stderr.isatty())
    print(format_report(report))
    if args.list_bad:
        print("\n" + format_bad(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
