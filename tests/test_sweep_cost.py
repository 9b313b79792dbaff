"""The counts of bench/sweep_cost.py (never its seconds), on hand-made trial reports."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import sweep_cost as sc  # noqa: E402

SPECS = ["ddim10", "ddim25", "ddim50"]


def end_row(images, kid, t_total=100.0):
    r = {"images_seen": images, "final": 1, "time_total_s": t_total, "eval_seconds": 30.0}
    for s in SPECS:
        r.update({f"gen_images_{s}": 128, f"gen_seconds_{s}": 4.0, f"feat_seconds_{s}": 6.0,
                  f"kid128_{s}": kid + SPECS.index(s) / 100})
    return r


def rung_row(cheap):
    return {"images_seen": 300, "final": 0, "time_total_s": 40.0, "eval_seconds": 5.0, "gen_images_ddim10": 64,
            "kid64_ddim10": cheap}


def trial(gamma, rows):
    return {"params": {"diffusion.p2_gamma": gamma}, "rows": rows}


def test_counts_of_the_three_strategies():
    full = [trial(g, [end_row(900, k)]) for g, k in ((0.0, 0.30), (0.5, 0.20), (1.0, 0.25))]
    asha = [trial(0.0, [rung_row(0.5)]), trial(0.5, [rung_row(0.3), end_row(900, 0.20)]),
            trial(1.0, [rung_row(0.4)])]
    b = sc.strategy_cost(full, ref_samples=500)
    assert (b["images_trained"], b["image_steps_generated"], b["images_featurised"]) == (2700, 3 * 128 * 85, 500 + 3 * 384)
    a = sc.naive_cost(full, SPECS, 128, 500, ref_seconds=10.0)
    assert (a["images_trained"], a["image_steps_generated"], a["images_featurised"]) == (8100, 3 * 128 * 85, 9 * 628)
    # per (configuration, steps): the training (100 - 30 s), that spec's generation and features, its own reference
    assert a["trial_seconds"] == pytest.approx(9 * (70 + 4 + 6 + 10))
    c = sc.strategy_cost(asha, ref_samples=500)
    assert (c["images_trained"], c["image_steps_generated"], c["images_featurised"]) == (
        300 + 900 + 300, 3 * 64 * 10 + 128 * 85, 500 + 3 * 64 + 384)
    assert sc.winner(full, "kid128", SPECS)[:2] == ((("diffusion.p2_gamma", 0.5),), "ddim10")
    assert sc.winner(asha, "kid128", SPECS)[:2] == sc.winner(full, "kid128", SPECS)[:2]
    r = sc.rung_vs_end(asha, full, "kid64_ddim10", "kid128_ddim10")
    assert r == {"configs": 3, "spearman": 1.0}  # cheap ranks 0.5 > 0.3 < 0.4 like 0.30 > 0.20 < 0.25


def test_steps_of_specs():
    assert [sc.steps_of(s) for s in ("ddim25", "250", "10,15,20", "10-15-20", "ddim25_ema0.07")] == [25, 250, 45, 45, 25]
