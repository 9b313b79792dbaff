"""The counts of sweeps.results.cost (what bench/sweep_cost.py prints; never its seconds), on hand-made trial
reports."""
import pytest

from sweeps.results import cost as sc

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
    assert sc.winner(full, "kid128", SPECS)[:3] == ((("diffusion.p2_gamma", 0.5),), "ddim10", None)
    assert sc.winner(asha, "kid128", SPECS)[:2] == sc.winner(full, "kid128", SPECS)[:2]
    r = sc.rung_vs_end(asha, full, "kid64_ddim10", "kid128_ddim10")
    assert r == {"configs": 3, "spearman": 1.0}  # cheap ranks 0.5 > 0.3 < 0.4 like 0.30 > 0.20 < 0.25


def ema_end_row(images, kid, chosen=None):
    """A final report of a power-EMA run: the tracked EMA (0.10), and 0.05 / 0.20 fully scored (`chosen` None) or
    on the cheap metric only, with the chosen EMA's metrics (`chosen` = its sigma_rel)."""
    r = end_row(images, kid)
    r["ema_eval_seconds"] = 12.0
    for e, d in ((0.05, -0.02), (0.20, 0.03)):
        if chosen is None:
            for s in SPECS:
                r.update({f"gen_images_{s}_ema{e:.2f}": 128, f"gen_seconds_{s}_ema{e:.2f}": 5.0,
                          f"feat_seconds_{s}_ema{e:.2f}": 6.0, f"kid128_{s}_ema{e:.2f}": r[f"kid128_{s}"] + d})
        else:
            r.update({f"gen_images_ddim10_ema{e:.2f}": 64, f"kid64_ddim10_ema{e:.2f}": 0.5 + d})
    if chosen is not None:
        r["ema_chosen"], r["ema_chosen_tracked"] = chosen, float(chosen == 0.10)
        r.update({"choose_gen_images_ddim10": 64, "kid64_ddim10": 0.5})
        for s in SPECS:
            r[f"kid128_{s}_emachosen"] = r[f"kid128_{s}"] + (-0.02 if chosen == 0.05 else 0.0)
            if chosen != 0.10:
                r[f"gen_images_{s}_emachosen"] = 128
    return r


def test_counts_of_the_ema_dimension():
    full = [trial(g, [ema_end_row(900, k)]) for g, k in ((0.0, 0.30), (1.0, 0.25))]
    cheap = [trial(0.0, [ema_end_row(900, 0.30, chosen=0.05)]), trial(1.0, [ema_end_row(900, 0.25, chosen=0.10)])]
    n = sc.naive_ema_cost(full, SPECS, [0.05, 0.20], 128, 500, ref_seconds=10.0)
    # 2 configurations x 3 EMA values: a training each (70 s, its reference), 3 evaluations each
    assert (n["images_trained"], n["image_steps_generated"], n["images_featurised"]) == (
        5400, 6 * 128 * 85, 6 * (500 + 3 * 128))
    assert n["trial_seconds"] == pytest.approx(2 * ((70 + 10 + 3 * 10) + 2 * (70 + 10 + 3 * 11)))
    d, e = sc.strategy_cost(full, 500), sc.strategy_cost(cheap, 500)
    assert d["images_trained"] == e["images_trained"] == 1800  # the EMA dimension trains nothing more
    assert d["image_steps_generated"] == 2 * 3 * 128 * 85
    # per configuration: the tracked EMA's evaluation, 3 cheap scores (its own included); one chosen EMA re-scored
    assert e["image_steps_generated"] == 2 * 128 * 85 + 2 * 3 * 64 * 10 + 128 * 85
    assert d["ema_eval_seconds"] == e["ema_eval_seconds"] == 24.0
    w = sc.winner(full, "kid128", SPECS, (None, 0.05, 0.20))
    assert w[:3] == ((("diffusion.p2_gamma", 1.0),), "ddim10", 0.05)
    wc = sc.winner(cheap, "kid128", SPECS, (None, "chosen"))
    assert wc[:3] == ((("diffusion.p2_gamma", 1.0),), "ddim10", None)  # it chose the tracked EMA: 0.25, a tie
    assert not sc.same_choice(w, wc, 0.10)
    assert sc.same_choice(wc, ((("diffusion.p2_gamma", 1.0),), "ddim10", 0.10, 0.25), 0.10)
    assert sc.chosen_against_full(cheap, full, "kid128", SPECS, 0.10) == pytest.approx(0.0)
    # a NaN is never a winner, not even as the first value visited
    full[0]["rows"][-1]["kid128_ddim10"] = float("nan")
    full[1]["rows"][-1]["kid128_ddim10_ema0.05"] = float("nan")
    assert sc.winner(full, "kid128", SPECS, (None, 0.05, 0.20))[1:4] == ("ddim25", 0.05, pytest.approx(0.24))
    assert sc.winner([full[0]], "kid128", ["ddim10"]) is None


def test_steps_of_specs():
    assert [sc.steps_of(s) for s in ("ddim25", "250", "10,15,20", "10-15-20", "ddim25_ema0.07")] == [25, 250, 45, 45, 25]
