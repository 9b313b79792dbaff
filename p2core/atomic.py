"""Nothing half-written on disk: every file p2sweep writes goes to a temp file beside it, then is renamed."""
import os
import tempfile


def atomic_write(path: str, write, binary: bool = True) -> str:
    """Call write(f) on a temp file in path's directory, fsync it, then rename it over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure as PNG atomically, then close it (also on error)."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
