import math
import os

import pytest
import torch

from helpers import tiny_cfg
from p2core import checkpoint as ck
from p2core.ema import EMA
from p2core.errors import Diverged, UserError
from p2core.trainer import Trainer, read_jsonl


def losses(path):
    return [(r["images_seen"], r["loss"]) for r in read_jsonl(os.path.join(path, "metrics.jsonl")) if r["kind"] == "train"]


def test_loss_goes_down_on_tiny_synthetic_set(tmp_path):
    cfg = tiny_cfg(train={"total_images": 512})
    Trainer(cfg, str(tmp_path), progress=False).run()
    ls = [l for _, l in losses(tmp_path)]
    assert sum(ls[-3:]) / 3 < 0.5 * sum(ls[:3]) / 3


def test_ema_update_rule():
    m = torch.nn.Linear(2, 1)
    ema = EMA(m, rate=0.9)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * m.weight)


def test_ema_warmup_rate():
    ema = EMA(torch.nn.Linear(2, 1), rate=0.99, warmup=True)
    assert ema.rate_at(0) == pytest.approx(0.1) and ema.rate_at(90) == pytest.approx(0.91)
    assert ema.rate_at(10_000) == 0.99 and EMA(torch.nn.Linear(2, 1), 0.99).rate_at(0) == 0.99


def test_checkpoint_round_trip_weights_only(tmp_path):
    cfg = tiny_cfg(train={"total_images": 64, "checkpoint_every_images": 32})
    tr = Trainer(cfg, str(tmp_path), progress=False)
    tr.run()
    path = ck.latest_checkpoint(os.path.join(tmp_path, "checkpoints"))
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == ck.FORMAT and obj["images_seen"] == 64 and "p2_gamma: 1.0" in obj["config_yaml"]
    tr2 = Trainer(cfg, str(tmp_path / "b"), progress=False, resume_from=path)
    for a, b in zip(tr.model.state_dict().values(), tr2.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(tr.ema.state_dict().values(), tr2.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert tr2.images_seen == 64
    # retention: keep_checkpoints = 2
    assert len(ck.list_checkpoints(os.path.join(tmp_path, "checkpoints"))) == 2
    assert not [f for f in os.listdir(os.path.join(tmp_path, "checkpoints")) if f.endswith(".tmp")]


def test_resume_gives_the_same_loss_sequence(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Trainer(tiny_cfg(), a, progress=False).run()
    cfg = tiny_cfg(train={"inject_crash_at_images": 160})
    with pytest.raises(RuntimeError, match="injected crash"):
        Trainer(cfg, b, progress=False).run()
    assert ck.latest_checkpoint(os.path.join(b, "checkpoints")).endswith("ckpt_000000000128.pt")
    Trainer(cfg, b, progress=False, resume=True).run()
    la, lb = losses(a), losses(b)
    assert [x for x, _ in la] == [x for x, _ in lb]
    assert all(math.isclose(x, y, rel_tol=1e-6) for (_, x), (_, y) in zip(la, lb))


def test_divergence_guard_names_the_image_count(tmp_path):
    cfg = tiny_cfg(train={"inject_nan_at_images": 48})
    with pytest.raises(Diverged) as e:
        Trainer(cfg, str(tmp_path), progress=False).run()
    assert e.value.images_seen == 48 and "48 images" in str(e.value)


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(tiny_cfg(), str(tmp_path), progress=False, resume=True)


def test_hooks_and_extra_eval_points(tmp_path):
    seen = {"eval": [], "ckpt": []}

    class Hooks:
        def on_eval(self, tr, rec):
            seen["eval"].append(rec["images_seen"])

        def on_checkpoint(self, tr, path):
            seen["ckpt"].append(os.path.basename(path))

    cfg = tiny_cfg(train={"eval_every_images": 128})
    Trainer(cfg, str(tmp_path), hooks=Hooks(), extra_eval_points=[48], progress=False).run()
    assert seen["eval"] == [48, 128, 256]
    assert seen["ckpt"] == ["ckpt_000000000128.pt", "ckpt_000000000256.pt"]


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    from p2core.data import load_dataset

    cfg = tiny_cfg(data={"dataset": "fashion_mnist", "path": str(tmp_path)})
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(cfg.data, 16, 1)


def test_fashion_mnist_idx_parsing_and_padding(tmp_path):
    import gzip

    import numpy as np

    from p2core.data import load_dataset

    imgs = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + imgs.tobytes())
    cfg = tiny_cfg(data={"dataset": "fashion_mnist", "path": str(tmp_path)})
    arr, key = load_dataset(cfg.data, 32, 1)
    assert arr.shape == (3, 1, 32, 32) and key.startswith("fmnist-")
    assert np.array_equal(arr[:, 0, 2:30, 2:30], imgs) and arr[:, :, :2].sum() == 0
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(UserError):
        load_dataset(cfg.data, 32, 1)


def test_image_folder_is_decoded_once_into_a_cache(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from p2core import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    cfg = tiny_cfg(data={"dataset": "folder", "path": str(folder), "cache_dir": str(tmp_path / "cache")})
    calls = []
    real = data.decode_folder
    monkeypatch.setattr(data, "decode_folder", lambda *a, **k: calls.append(1) or real(*a, **k))
    a1, k1 = data.load_dataset(cfg.data, 16, 3)
    a2, k2 = data.load_dataset(cfg.data, 16, 3)
    assert len(calls) == 1 and k1 == k2 and a1.shape == (3, 3, 16, 16) and int(a2[2].max()) == 80
    (folder / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        data.load_dataset(cfg.data, 16, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .png/.jpg"):
        data.load_dataset(tiny_cfg(data={"dataset": "folder", "path": str(empty)}).data, 16, 3)


def test_init_from_p2sweep_and_bare_official_state_dict(tmp_path):
    src = Trainer(tiny_cfg(train={"total_images": 32}), str(tmp_path / "src"), progress=False)
    src.run()
    path = ck.latest_checkpoint(os.path.join(tmp_path, "src", "checkpoints"))
    t = Trainer(tiny_cfg(), str(tmp_path / "a"), progress=False, init_from=path)
    assert all(torch.equal(a, b) for a, b in zip(t.model.state_dict().values(), src.model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(t.ema.state_dict().values(), src.ema.state_dict().values()))
    assert t.images_seen == 0  # weights only: a new run
    bare = tmp_path / "ema_0.9999_000032.pt"
    torch.save({"module." + k: v for k, v in src.ema.state_dict().items()}, bare)  # DDP-style official file
    t2 = Trainer(tiny_cfg(), str(tmp_path / "b"), progress=False, init_from=str(bare))
    assert all(torch.equal(a, b) for a, b in zip(t2.model.state_dict().values(), src.ema.state_dict().values()))
    with pytest.raises(UserError, match="shape"):
        Trainer(tiny_cfg(model={"num_channels": 64}), str(tmp_path / "c"), progress=False, init_from=str(bare))
