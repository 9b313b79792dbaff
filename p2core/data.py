"""Training images as a uint8 array [N, C, H, W], decoded once.

Sources: Fashion-MNIST idx files (1 channel, 28x28 padded or resized to the model's size), a folder of png/jpg
images (resize shorter side + center crop; decoded once into a memory-mapped cache keyed by the file list's
names, sizes and mtimes), or a synthetic set for tests. Batches are drawn as float tensors in [-1, 1].
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os

import numpy as np

from .atomic import atomic_write
from .errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
PREPROC_VERSION = "v1"  # bump when decoding/cropping changes, so caches miss


def default_cache_dir(configured: str = "") -> str:
    return configured or os.environ.get("P2SWEEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "p2sweep")


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive inter-process lock (fcntl) on `path`; the lock file stays, its content does not matter."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_save_npy(path: str, arr: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, arr))


# -- Fashion-MNIST --------------------------------------------------------------------------------------------

def _read_idx_images(path: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read Fashion-MNIST idx file ({e})") from None
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
        raise UserError(f"{path}: not an idx3 image file (bad magic number)")
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise UserError(f"{path}: truncated idx file ({len(raw)} bytes, expected {16 + n * h * w})")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w)


def fashion_mnist_file(path: str = "", split: str = "train") -> str:
    d = path or FASHION_MNIST_DIR
    stem = "train" if split == "train" else "t10k"
    for name in (f"{stem}-images-idx3-ubyte.gz", f"{stem}-images-idx3-ubyte"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    raise UserError(f"data.path: Fashion-MNIST not found in {d} (expected {stem}-images-idx3-ubyte.gz). "
                    "Install it with `apt-get install dataset-fashion-mnist`, or set data.path to a folder with the idx files")


def resize_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    """[N, C, h, w] uint8 -> [N, C, size, size]: zero-pad symmetrically when it fits (28 -> 32), else area-resize."""
    n, c, h, w = arr.shape
    if h == size and w == size:
        return np.ascontiguousarray(arr)
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((n, c, size, size), dtype=np.uint8)
        out[:, :, top:top + h, left:left + w] = arr
        return out
    import torch
    import torch.nn.functional as F

    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(arr)).float(), size=(size, size), mode="area")
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


# -- image folders --------------------------------------------------------------------------------------------

def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such image folder")
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    if not files:
        raise UserError(f"{folder}: no .png/.jpg images found")
    return sorted(files)


def folder_fingerprint(files: list[str], folder: str) -> str:
    """Cheap identity of a folder's content: names, sizes and mtimes (no image is read)."""
    h = hashlib.sha256()
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """Decode one image -> uint8 [C, size, size]: shorter side resized to `size` (bicubic), then center-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read image ({e.__class__.__name__})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_folder(files: list[str], size: int, channels: int, progress: bool = True) -> np.ndarray:
    from tqdm.auto import tqdm

    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, p in enumerate(tqdm(files, desc="decoding images", disable=not progress or len(files) < 200)):
        out[i] = load_image(p, size, channels)
    return out


def load_folder_cached(folder: str, size: int, channels: int, cache_dir: str = "") -> tuple[np.ndarray, str]:
    """The folder as uint8 [N, C, size, size], memory-mapped from a cache that concurrent trials build once."""
    files = list_images(folder)
    key = f"folder-{folder_fingerprint(files, folder)}-{size}-{channels}-{PREPROC_VERSION}"
    path = os.path.join(default_cache_dir(cache_dir), "data", key + ".npy")
    if not os.path.exists(path):
        with file_lock(path + ".lock"):
            if not os.path.exists(path):
                atomic_save_npy(path, decode_folder(files, size, channels))
    return np.load(path, mmap_mode="r"), key


# -- synthetic (tests) ----------------------------------------------------------------------------------------

def synthetic_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth random blobs, uint8 [n, C, size, size]; deterministic in seed. For tests only."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        for c in range(channels):
            out[i, c] = np.clip(255 * blob * rng.uniform(0.5, 1.0), 0, 255).astype(np.uint8)
    return out


# -- entry point ----------------------------------------------------------------------------------------------

def load_dataset(data_cfg, image_size: int, channels: int) -> tuple[np.ndarray, str]:
    """(images uint8 [N, C, S, S], dataset identity key) for a DataConfig."""
    if data_cfg.dataset == "fashion_mnist":
        if channels != 1:
            raise UserError(f"model.in_channels: Fashion-MNIST has 1 channel, the config has {channels}")
        f = fashion_mnist_file(data_cfg.path)
        with open(f, "rb") as fh:  # the idx file's hash: ~30 MB, tens of milliseconds
            digest = hashlib.sha256(fh.read()).hexdigest()[:12]
        arr = resize_uint8(_read_idx_images(f), image_size)
        key = f"fmnist-{digest}-{image_size}"
    elif data_cfg.dataset == "folder":
        arr, key = load_folder_cached(data_cfg.path, image_size, channels, data_cfg.cache_dir)
    else:
        n = data_cfg.max_images or 256
        arr, key = synthetic_images(n, image_size, channels), f"synthetic-{n}-{image_size}-{channels}"
    if data_cfg.max_images and len(arr) > data_cfg.max_images:
        arr = arr[: data_cfg.max_images]
        key += f"-first{data_cfg.max_images}"
    if len(arr) == 0:
        raise UserError("data: the dataset is empty")
    return arr, key


def to_float(batch_uint8):
    """uint8 tensor -> float in [-1, 1] (x / 127.5 - 1)."""
    return batch_uint8.float() / 127.5 - 1.0


def to_uint8(x):
    """[-1, 1] float tensor -> uint8 as the official sampling script writes its PNG/npz: ((x+1)*127.5), clamped to
    [0, 255], truncated (not rounded), so FIDs compare with the official numbers."""
    import torch

    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
