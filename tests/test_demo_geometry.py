"""benchmarks/demo_geometry.py: the negatives it compares are those that differ in one attribute
alone, and its figures are cosines of a real export's embeddings."""

import math

from mmpretrain.build import build_task
from mmpretrain.config import load_config
from mmpretrain.data import demo
from mmpretrain.export import export_model
from mmpretrain.tokenizer import Tokenizer

from conftest import ROOT, benchmark

demo_geometry = benchmark("demo_geometry")


def test_each_concepts_hard_negatives_are_the_other_values_of_one_attribute():
    concepts = demo.all_concepts()
    values = {"colour": demo.COLOURS, "shape": demo.SHAPES, "place": demo.PLACES}
    for attribute in demo_geometry.ATTRIBUTES:
        mask = demo_geometry.differs_only_in(concepts, attribute)
        assert (mask.sum(1) == len(values[attribute]) - 1).all()
        assert (mask == mask.t()).all() and not mask.diagonal().any()
        i, j = mask.nonzero()[0].tolist()
        a, b = concepts[i], concepts[j]
        assert [x for x in demo_geometry.ATTRIBUTES if getattr(a, x) != getattr(b, x)] == [attribute]


def test_an_exports_figures_are_cosines_and_each_closest_is_above_its_mean(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    export_model(build_task(cfg, Tokenizer(cfg.model.text).vocab_size).state_dict(), cfg, tmp_path / "export")
    rows = demo_geometry.geometry(str(tmp_path / "export"))
    assert set(rows) == {"text-image", "text-audio", "text-text"}
    assert math.isclose(rows["text-text"]["pair"], 1.0, abs_tol=1e-5)
    for row in rows.values():
        assert 0 <= row["R@1"] <= 1 and -1 <= row["pair"] <= 1
        for attribute in demo_geometry.ATTRIBUTES:
            assert -1 <= row[attribute] <= row[f"{attribute} closest"] <= 1
