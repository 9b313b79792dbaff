"""The numbers of `p2sweep report` (sweeps/results/analysis.py) against closed forms and hand-computed cases, and
the pages written from a synthetic sweep directory (no Ray)."""
import json
import math
import os

import pytest

from sweeps.results import analysis as A
from sweeps.results.trials import Trial

# Student t quantiles from the tables (not computed by the code under test)
T975 = {1: 12.706204736174707, 2: 4.302652729749464, 4: 2.7764451051977987}


def test_t_interval_matches_the_tabulated_quantile():
    m, lo, hi = A.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3
    half = T975[2] / math.sqrt(3)
    assert m == pytest.approx(2.0)
    assert (lo, hi) == (pytest.approx(2 - half, rel=1e-9), pytest.approx(2 + half, rel=1e-9))
    m, lo, hi = A.t_interval([0.5, -0.5])  # mean 0, sd sqrt(0.5), n 2
    assert hi == pytest.approx(T975[1] * math.sqrt(0.5) / math.sqrt(2), rel=1e-9)
    vals = [0.1, 0.3, 0.2, 0.5, 0.4]
    sd = math.sqrt(sum((v - 0.3) ** 2 for v in vals) / 4)
    assert A.t_interval(vals)[2] == pytest.approx(0.3 + T975[4] * sd / math.sqrt(5), rel=1e-9)
    assert math.isnan(A.t_interval([1.0])[1]) and A.t_interval([1.0])[0] == 1.0


def _trial(tid, group, seed, points, params, state="TERMINATED"):
    return Trial(trial_id=tid, dir="", config={**params, "p2sweep_group": group, "train.seed": seed}, group=group,
                 seed=seed, state=state, images_seen=max(points), points=points)


ARMS = {0: {A.GAMMA: 0.0, A.SCHEDULE: "linear"}, 1: {A.GAMMA: 1.0, A.SCHEDULE: "linear"},
        2: {A.GAMMA: 0.0, A.SCHEDULE: "cosine"}, 3: {A.GAMMA: 1.0, A.SCHEDULE: "cosine"}}


def test_baseline_arm_is_gamma_zero_with_the_other_values_equal():
    assert A.baseline_of(ARMS[1], ARMS) == 0
    assert A.baseline_of(ARMS[3], ARMS) == 2
    assert A.baseline_of(ARMS[0], ARMS) is None  # a baseline has none
    assert A.baseline_of({A.GAMMA: 1.0, A.K: 5.0, A.SCHEDULE: "linear"}, ARMS) == 0  # k does nothing at gamma 0
    assert A.baseline_of({A.GAMMA: 1.0, A.SCHEDULE: "quad"}, ARMS) is None
    assert A.arm_label(ARMS[1], {"diffusion": {"p2_k": 1.0}}) == "P2 gamma=1, k=1, linear"
    assert A.arm_label(ARMS[2], {}) == "baseline (gamma=0), cosine"


def test_comparison_pairs_seeds_at_each_point_and_words_the_interval():
    m = "kid1000_ddim25"
    base = [_trial("b0", 0, 0, {100: {m: 0.30}, 200: {m: 0.20}}, ARMS[0]),
            _trial("b1", 0, 1, {100: {m: 0.32}, 200: {m: 0.22}}, ARMS[0]),
            _trial("b2", 0, 2, {100: {m: 0.34}, 200: {m: 0.21}}, ARMS[0])]
    arm = [_trial("a0", 1, 0, {100: {m: 0.28}, 200: {m: 0.10}}, ARMS[1]),
           _trial("a1", 1, 1, {100: {m: 0.33}, 200: {m: 0.13}}, ARMS[1]),
           _trial("a2", 1, 2, {100: {m: 0.30}}, ARMS[1])]  # seed 2 has no value at 200: not paired there
    cs = A.compare(arm, base, m, 1, 0)
    assert [c.images_seen for c in cs] == [100, 200]
    c100, c200 = cs
    assert c100.seeds == [0, 1, 2]
    d = [-0.02, 0.01, -0.04]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert c100.diff == pytest.approx(mean)
    assert c100.high == pytest.approx(mean + T975[2] * sd / math.sqrt(3))
    assert not c100.distinguishable
    assert "not distinguishable from seed noise" in c100.sentence("P2")
    assert c200.seeds == [0, 1] and c200.diff == pytest.approx(-0.095)
    # differences -0.10 and -0.09: half-width 12.706 * 0.00707 / sqrt(2) = 0.0635, so [-0.1585, -0.0315]
    assert (c200.low, c200.high) == (pytest.approx(-0.1585, abs=1e-4), pytest.approx(-0.0315, abs=1e-4))
    assert c200.distinguishable
    s = c200.sentence("P2 gamma=1, k=1, linear", )
    assert s.startswith("P2 gamma=1, k=1, linear: KID-1000 (ddim25) lower than the baseline by 0.095 [0.0315, 0.159]")
    assert "2 seeds," in s and s.endswith("better than the baseline")


def test_curve_mean_and_band_over_the_seeds_present():
    m = "kid10_ddim5"
    ts = [_trial("a", 0, 0, {10: {m: 1.0}, 20: {m: 0.5}}, ARMS[0]),
          _trial("b", 0, 1, {10: {m: 3.0}, 20: {m: float("inf")}}, ARMS[0])]
    c = A.curve(ts, m)
    assert c[0] == {"images_seen": 10, "mean": 2.0, "min": 1.0, "max": 3.0, "seeds": [0, 1], "values": [1.0, 3.0]}
    assert c[1]["values"] == [0.5] and c[1]["seeds"] == [0]  # a non-finite value is left out, not averaged


def test_cost_from_reports():
    t = _trial("a", 0, 0, {100: {}, 200: {}}, ARMS[0])
    rows = [{"images_seen": 100, "gen_images_ddim25": 50, "gen_seconds_ddim25": 2.0, "feat_seconds_ddim25": 3.0,
             "eval_seconds": 5.5, "time_total_s": 20.0},
            {"images_seen": 200, "gen_images_ddim25": 50, "gen_images_250": 10, "gen_images_50-25-25": 4,
             "gen_seconds_ddim25": 2.0, "feat_seconds_ddim25": 3.0, "eval_seconds": 6.5, "time_total_s": 40.0}]
    c = A.trial_cost(t, rows)
    assert (c.images_generated, c.image_steps) == (114, 50 * 25 * 2 + 10 * 250 + 4 * 100)  # section spec: 50+25+25
    assert (c.sample_seconds, c.feature_seconds, c.eval_seconds) == (4.0, 6.0, 12.0)
    assert (c.wall_seconds, c.train_seconds) == (40.0, 28.0)
    stopped = A.TrialCost("b", 1, 0, "STOPPED", "", 100)
    diverged = A.TrialCost("c", 2, 0, "DIVERGED", "", 50)
    s = A.cost_summary([c, stopped, diverged], max_images=200)
    # only early stopping's shortfall counts as saved: the diverged trial saved nothing
    assert s.images_trained == 350 and s.images_if_all_to_end == 450
    assert s.early_stop_saved == pytest.approx(100 / 450)


def test_a_nonfinite_seed_withholds_the_verdict():
    m = "kid10_ddim5"
    base = [_trial(f"b{s}", 0, s, {100: {m: 0.3}}, ARMS[0]) for s in range(3)]
    arm = [_trial("a0", 1, 0, {100: {m: 0.1}}, ARMS[1]), _trial("a1", 1, 1, {100: {m: 0.11}}, ARMS[1]),
           _trial("a2", 1, 2, {100: {m: float("inf")}}, ARMS[1], state="DIVERGED")]
    (c,) = A.compare(arm, base, m, 1, 0, seeds_expected=3)
    assert c.seeds == [0, 1] and c.nonfinite == 1
    s = c.sentence("P2")
    assert "2 seeds of 3" in s and "no verdict" in s and "better" not in s


def test_phase_losses_from_the_training_log_records():
    rows = [{"train_log": json.dumps([{"images_seen": 64, "loss_coarse": 1.0, "loss_content": 0.5}])},
            {"train_log": json.dumps([{"images_seen": 128, "loss_coarse": 0.8, "loss_cleanup": 0.1}])}]
    p = A.phase_losses(rows)
    assert p == [{"images_seen": 64, "coarse": 1.0, "content": 0.5, "cleanup": None},
                 {"images_seen": 128, "coarse": 0.8, "content": None, "cleanup": 0.1}]
    mean = A.mean_phase_curve([p, [{"images_seen": 64, "coarse": 3.0, "content": 1.5, "cleanup": None}]])
    assert mean == [{"images_seen": 64, "n": 2, "coarse": 2.0, "content": 1.0, "cleanup": None},
                    {"images_seen": 128, "n": 1, "coarse": 0.8, "content": None, "cleanup": 0.1}]  # seeds present


# -- the pages, from a synthetic sweep directory --------------------------------------------------------------------

M = "kid100_ddim10"


@pytest.fixture
def written(tmp_path):
    """A 2-arm x 3-seed sweep's trial folders (result.json, a sample grid) and the report written from them."""
    from types import SimpleNamespace

    from PIL import Image

    from sweeps.record.spec import Search, SweepSpec
    from sweeps.results import report_data
    from sweeps.results import report_page

    trials = []
    for g, gamma in ((0, 0.0), (1, 1.0)):
        for seed in range(3):
            d = tmp_path / "sweep" / f"g{g}s{seed}"
            (d / "p2" / "samples").mkdir(parents=True)
            Image.new("L", (40, 40), 60 * g + 20 * seed).save(d / "p2" / "samples" / "grid_000000000200.png")
            rows, points = [], {}
            for i, p in enumerate((100, 200)):
                v = 0.5 / (i + 1) - 0.05 * g + 0.01 * seed
                points[p] = {M: v}
                log = [{"images_seen": p - 50, "loss_coarse": 1.0 + g, "loss_content": 0.5, "loss_cleanup": 0.1}]
                rows.append({"images_seen": p, M: v, "gen_images_ddim10": 100, "gen_seconds_ddim10": 1.0,
                             "feat_seconds_ddim10": 2.0, "eval_seconds": 3.0, "time_total_s": 10.0 * (i + 1),
                             "train_log": json.dumps(log)})
            (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
            trials.append(Trial(trial_id=f"t{g}{seed}", dir=str(d), group=g, seed=seed, state="TERMINATED",
                                images_seen=200, points=points, history=[(p, points[p][M]) for p in points],
                                config={A.GAMMA: gamma, "p2sweep_group": g, "train.seed": seed}))
    meta = SimpleNamespace(name="syn", metric=M, max_images=200, seeds=[0, 1, 2], dir=str(tmp_path / "sweep"),
                           base={"diffusion": {"p2_k": 1.0, "noise_schedule": "linear", "diffusion_steps": 100},
                                 "eval": {"sampling_steps": ["ddim10"], "extractor": "random"}},
                           spec=SweepSpec("syn", {}, M, {A.GAMMA: ("grid", [0.0, 1.0])}, search=Search("grid")))
    data = report_data.collect(meta, trials, provenance={"git_commit": "abc"}, baselines={}, importance=None,
                               expected_trials=6)
    return data, report_page.write_report(str(tmp_path / "report"), data, trials)


def test_report_pages_hold_the_comparison_and_every_figure(written):
    data, paths = written
    (c_end,) = [c for c in data["comparisons"] if c["images_seen"] == 200]
    assert c_end["diff"] == pytest.approx(-0.05) and c_end["n"] == 3 and c_end["distinguishable"]
    assert "KID-100 (ddim10) lower than the baseline by 0.05" in c_end["sentence"]
    html_text = open(paths["html"]).read()
    assert c_end["sentence"] in html_text.replace("&#x27;", "'")
    assert html_text.count("data:image/png;base64,") == 3 + 2  # curves, weights, phases; 2 grids (1 parameter: no parallel plot)
    md = open(paths["md"]).read()
    assert "figures/grid_0.png" in md and "figures/grid_1.png" in md and c_end["sentence"] in md
    assert data["cost"]["total"]["images_generated"] == 6 * 200 and data["sweep"]["state"] == "finished"
    assert json.load(open(paths["json"]))["tables"][M][0]["best"] is True
    assert data["grids_at"] == 200 and "at 200 images" in md.replace(",", "")


def test_report_replaces_only_a_report_folder(written, tmp_path):
    from p2core.errors import UserError
    from sweeps.results import report_page

    data, paths = written
    again = report_page.write_report(paths["dir"], data, [])  # an older report is replaced
    assert os.path.isfile(again["json"])
    other = tmp_path / "paper"
    other.mkdir()
    (other / "draft.tex").write_text("keep me")
    with pytest.raises(UserError, match="not a p2sweep report folder"):
        report_page.write_report(str(other), data, [])
    assert (other / "draft.tex").read_text() == "keep me"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".report-")]


def test_report_opens_in_a_real_browser_with_its_images_loaded(written, tmp_path):
    """Headless Chromium (Debian's; `make test` installs it when run as root) loads a copy of the page with a
    test-side script that counts the images that decoded."""
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if exe is None:
        pytest.skip("chromium is not installed: `make test` installs Debian's chromium with apt when run as root")
    _, paths = written
    page = open(paths["html"]).read().replace("</body>", (
        "<script>window.addEventListener('load',()=>{const im=[...document.images];"
        "document.body.setAttribute('data-loaded',im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length)"
        "});</script></body>"))
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(args + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-loaded="5/5"' in dom.stdout, (dom.stdout[-500:], dom.stderr[-2000:])
    shot = tmp_path / "shot.png"
    subprocess.run(args + ["--window-size=1200,2400", f"--screenshot={shot}", "file://" + paths["html"]],
                   capture_output=True, timeout=120)
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1200, 2400) and len(set(im.getdata())) > 20  # rendered text and figures, not a blank page


def test_parameter_importance_from_optuna_and_its_minimum(tmp_path):
    """PED-ANOVA on the sweep's study: withheld below the minimum of finite COMPLETE configurations (a diverged +inf
    one does not count), shown above it with the parameter that decides the value first."""
    import optuna

    from sweeps.tune.schedulers import param_importance

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=0))

    def add(n):
        for _ in range(n):
            t = study.ask({"gamma": optuna.distributions.FloatDistribution(0.0, 2.0),
                           "noise": optuna.distributions.FloatDistribution(0.0, 1.0)})
            study.tell(t, (t.params["gamma"] - 1.0) ** 2 + 0.01 * t.params["noise"])

    add(6)
    t = study.ask({"gamma": optuna.distributions.FloatDistribution(0.0, 2.0),
                   "noise": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study.tell(t, float("inf"))  # a configuration that diverged: COMPLETE with +inf, not counted
    imp = param_importance(url, "s", minimum=8)
    assert imp["complete"] == 6 and not imp["values"] and "not shown" in imp["note"]
    add(44)
    imp = param_importance(url, "s", minimum=8)
    assert imp["complete"] == 50 and list(imp["values"])[0] == "gamma", imp
    assert "PED-ANOVA" in imp["evaluator"]
    assert param_importance(f"sqlite:///{tmp_path / 'o.db'}", "nosuch", 8)["note"].startswith("parameter importance: no")


def test_each_arm_at_its_own_best_ema_against_one_common_ema():
    """Post-hoc EMAs: P2 beats the baseline at the tracked EMA (every seed 0.04 lower), but with each at its own
    best EMA (P2 at 0.15, the baseline at 0.05) the paired differences are -0.01, -0.01, +0.02: not distinguishable,
    so the verdict changes; the report says so in a table and a sentence."""
    from sweeps.results import report_data
    from sweeps.results.report_render import render_md, sections

    m = "kid1000_ddim25"
    vals = {0: {m: [0.30, 0.31, 0.32], f"{m}_ema0.05": [0.25, 0.27, 0.23], f"{m}_ema0.15": [0.35, 0.36, 0.37]},
            1: {m: [0.26, 0.27, 0.28], f"{m}_ema0.05": [0.27, 0.28, 0.29], f"{m}_ema0.15": [0.24, 0.26, 0.25]}}
    trials = [_trial(f"t{g}{s}", g, s, {100: {n: v[s] for n, v in vals[g].items()}}, ARMS[g])
              for g in (0, 1) for s in range(3)]
    names = sorted(vals[0])
    mean_of = lambda g, n: sum(vals[g][n]) / 3
    (x,) = A.own_best_ema(trials[3:], trials[:3], names, mean_of, 1, 0, 3)
    assert (x["arm_metric"], x["baseline_metric"]) == (f"{m}_ema0.15", f"{m}_ema0.05")
    assert x["common"]["diff"] == pytest.approx(-0.04) and x["common_verdict"] == "better"
    assert x["own_best"]["arm_values"] == [0.24, 0.26, 0.25] and x["own_best"]["baseline_values"] == [0.25, 0.27, 0.23]
    assert x["own_best_verdict"] == "not distinguishable" and x["verdict_changes"]
    nan_seed = A.compare(trials[3:], [_trial("n0", 0, 0, {100: {m: float("nan")}}, ARMS[0]), *trials[1:3]], m, 1, 0)
    assert A.verdict(A.headline(nan_seed)) == "no verdict"  # a NaN seed withholds it, as the sentence does
    # through the report's data and pages
    from sweeps.record.meta import Paths, SweepMeta
    from sweeps.record.spec import Scheduler, SweepSpec

    meta = SweepMeta("syn", "x", SweepSpec("syn", {}, m, {}, scheduler=Scheduler(max_images=100), seeds=[0, 1, 2]),
                     Paths("", "", "", ""), "", "syn")
    data = report_data.collect(meta, trials, provenance={}, baselines={}, importance=None, expected_trials=6)
    (y,) = data["ema_answer"]
    assert (y["arm_metric"], y["baseline_metric"], y["verdict_changes"]) == (x["arm_metric"], x["baseline_metric"], True)
    assert "each at its own best EMA: EMA sigma_rel 0.15 against the baseline's EMA sigma_rel 0.05" in y["sentence"]
    md = render_md(sections(data, {}, {}), {})
    assert "At one common EMA and at each arm's own best EMA" in md and y["sentence"] in md
    assert "| 0.15 / 0.05 | better | not distinguishable | yes |" in md
