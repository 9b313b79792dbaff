"""The one filesystem layer for a sweep's storage: every file p2sweep reads or writes there goes through here.

A storage is a local or NFS path, or an object-store URI (`s3://bucket/prefix`, `gs://...`). Both go through
`pyarrow.fs`, the layer Ray Tune itself uses for `storage_path`, so p2sweep and Tune see the same files. For S3 the
endpoint, region and credentials come from the usual places (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`, an instance profile), never from a p2sweep file.

Paths stay strings (a local absolute path or a URI) so they read the same in messages and in `p2sweep.json`.
Writes are whole-object: a local file is written to a temp file and renamed, an object PUT is atomic by itself.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import posixpath

from p2core.errors import UserError


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_uri(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path)


def _endpoint_env() -> tuple:
    """What selects a bucket's filesystem besides its name (a cached filesystem is reused only while it is the same)."""
    return tuple(os.environ.get(k, "") for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION",
                                                  "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                                                  "AWS_SHARED_CREDENTIALS_FILE"))


@functools.lru_cache(maxsize=16)
def _object_fs(scheme: str, bucket: str, _env: tuple):
    import pyarrow.fs as pafs

    if scheme == "s3":
        # pyarrow reads AWS_ENDPOINT_URL_S3 itself; AWS_ENDPOINT_URL is the SDKs' general form of it
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        kw = {}
        if ep:
            scheme_, _, host = ep.partition("://")
            kw = {"endpoint_override": host or ep, "scheme": scheme_ if host else "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not ep:
            try:  # AWS itself: a bucket outside the default region answers 301 unless asked in its own region
                region = pafs.resolve_s3_region(bucket)
            except OSError:
                region = ""
        if region:
            kw["region"] = region
        return pafs.S3FileSystem(**kw)
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def resolve(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    scheme, _, rest = path.partition("://")
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath("/" + rest.lstrip("/"))
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise UserError(f"storage {path}: no bucket in the URI (expected {scheme}://BUCKET/PREFIX)")
    if "?" in rest or "//" in rest.rstrip("/"):
        raise UserError(f"storage {path}: expected {scheme}://BUCKET/PREFIX without '?options' or empty parts "
                        "(the endpoint comes from AWS_ENDPOINT_URL_S3 or the sweep file's tracking.s3_endpoint_url)")
    try:
        fs = _object_fs(scheme, bucket, _endpoint_env())
    except Exception as e:  # an unknown scheme, a filesystem pyarrow was built without
        raise UserError(f"storage {path}: {str(e).splitlines()[0]}") from None
    return fs, rest.rstrip("/")


def ray_storage(path: str) -> tuple:
    """(storage_path, storage_filesystem) for Ray Tune's RunConfig / Tuner.restore: the same filesystem object
    p2sweep uses (so the endpoint settings agree), or (path, None) for a local path."""
    if not is_uri(path):
        return os.path.abspath(path), None
    fs, p = resolve(path)
    return p, fs


def _wrap(path: str, e: Exception) -> UserError:
    hint = ""
    if is_uri(path) and path.startswith("s3://"):
        hint = (" (object storage: are AWS_ENDPOINT_URL_S3 and the credentials set for this shell, and does the "
                "bucket exist?)")
    return UserError(f"storage {path}: {str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__}{hint}")


def _type(path: str):
    """pyarrow's FileType of `path` (NotFound, File, Directory); storage errors as one line."""
    fs, p = resolve(path)
    try:
        return fs.get_file_info(p).type
    except OSError as e:
        raise _wrap(path, e) from None


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) != pafs.FileType.NotFound


def isfile(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.File


def isdir(path: str) -> bool:
    import pyarrow.fs as pafs

    return _type(path) == pafs.FileType.Directory


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    fs, p = resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        if not exists(path):  # pyarrow says "Path does not exist" as a plain OSError for some stores
            return None
        raise _wrap(path, e) from None


def read_text(path: str) -> str | None:
    b = read_bytes(path)
    return None if b is None else b.decode("utf-8")


def write_bytes(path: str, data: bytes) -> str:
    if not is_uri(path):
        from p2core.atomic import atomic_write

        return atomic_write(path, lambda f: f.write(data))
    fs, p = resolve(path)
    try:
        with fs.open_output_stream(p) as f:  # one PUT: readers see the old object or the new one
            f.write(data)
    except OSError as e:
        raise _wrap(path, e) from None
    return path


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
    """Append (object stores have no append: read, then write the whole object; for the driver's own small files)."""
    if not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    write_text(path, (read_text(path) or "") + text)


def remove(path: str, tree: bool = False) -> None:
    """Delete a file, or with `tree` a folder and everything in it; nothing there is not an error."""
    fs, p = resolve(path)
    try:
        (fs.delete_dir if tree else fs.delete_file)(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _wrap(path, e) from None


def remove_tree(path: str) -> None:
    remove(path, tree=True)


def listdir(path: str) -> list[str]:
    """Names of the entries directly in `path` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    except OSError as e:
        raise _wrap(path, e) from None
    return sorted(i.base_name for i in infos)


def glob(path: str, pattern: str) -> list[str]:
    """Entries of `path` whose name matches `pattern` (fnmatch), as full paths, sorted."""
    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def children_with(path: str, name: str) -> list[str]:
    """`path/*/name` that exist: one listing of `path` and one of each child (`glob` of `*/name`)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        subs = [i for i in infos if i.type == pafs.FileType.Directory]
        found = fs.get_file_info([f"{i.path}/{name}" for i in subs]) if subs else []
    except OSError as e:
        raise _wrap(path, e) from None
    return sorted(join(path, i.base_name, name) for i, f in zip(subs, found) if f.type == pafs.FileType.File)


def download(path: str, local: str) -> str | None:
    """Copy a file or folder of the storage to a local path (a local storage path is copied too, so the caller can
    treat the result as its own); returns `local`, or None when there is nothing at `path`."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            return None
        # a file needs its parent folder, a folder itself
        os.makedirs(os.path.dirname(os.path.abspath(local)) if info.type == pafs.FileType.File else local,
                    exist_ok=True)
        pafs.copy_files(p, os.path.abspath(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        raise _wrap(path, e) from None
    return local


def upload(local: str, path: str) -> str:
    """Copy a local file to the storage (a temp object name is not needed: an object PUT is atomic)."""
    with open(local, "rb") as f:
        return write_bytes(path, f.read())


def fetch(path: str, local: str) -> str:
    """Copy a storage file to `local` unless it is already there: once per node (under the same file lock the
    evaluator takes for the file), into a unique temp name, then renamed, so no reader sees half a file. Returns
    "cache" (was there), "storage" (copied now) or "" (no such file)."""
    import tempfile

    from p2core.data import file_lock

    if os.path.exists(local):
        return "cache"
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    with file_lock(local + ".lock"):
        if os.path.exists(local):
            return "cache"
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(local)), prefix=".fetch-")
        os.close(fd)
        try:
            if download(path, tmp) is None:
                return ""
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return "storage"


def upload_dir(local: str, path: str) -> str:
    """Copy a local folder into the storage (its files are replaced one by one)."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        pafs.copy_files(os.path.abspath(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise _wrap(path, e) from None
    return path


def file_sizes(path: str, recursive: bool = False) -> dict:
    """{path relative to `path` (posix '/'): size in bytes} of the files under `path` (folders left out; empty when
    it does not exist). One listing, as `listdir`."""
    import pyarrow.fs as pafs

    fs, p = resolve(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    except OSError as e:
        raise _wrap(path, e) from None
    base = p.rstrip("/") + "/"
    return {i.path[len(base):].replace(os.sep, "/") if i.path.startswith(base) else i.base_name: i.size
            for i in infos if i.type == pafs.FileType.File}


def sync_dir(local: str, path: str, last: tuple = ()) -> str:
    """Make the folder `path` hold exactly the files of the local folder `local`, never without a whole version:
    every file is uploaded over the old one (the files named in `last`, e.g. the page that links the others, after
    the rest), and only then are the old files the new version lacks deleted. (An object store has no folder rename:
    deleting the old folder first would leave readers nothing, or half a folder, while the upload runs.)"""
    new = set(file_sizes(local, recursive=True))
    for rel in sorted(new, key=lambda r: (r in last, r)):
        upload(os.path.join(local, *rel.split("/")), join(path, *rel.split("/")))  # temp + rename, or one PUT
    for rel in sorted(set(file_sizes(path, recursive=True)) - new):
        remove(join(path, *rel.split("/")))
    return path
