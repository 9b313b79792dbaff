"""sweeps/storage/fs.py on local paths (the same code serves s3://, tested against a real S3 API in
tests/cluster/test_s3_storage.py), moved-storage re-rooting, and the credential checks of sweep files."""
import os

import pytest

from p2core.errors import UserError
from sweeps.storage import fs as S
from sweeps.record.meta import _follow_move
from sweeps.results.trials import _runs_of
from sweeps.record.spec import has_credentials


def test_read_write_list_and_fetch_on_a_path(tmp_path):
    d = str(tmp_path / "exp")
    assert S.read_text(S.join(d, "none.json")) is None and S.listdir(d) == [] and not S.exists(d)
    S.write_text(S.join(d, "a", "result.json"), '{"x": 1}\n')
    S.write_text(S.join(d, "b", "other.txt"), "y")
    S.write_text(S.join(d, "experiment_state-2.json"), "{}")
    assert S.read_text(S.join(d, "a", "result.json")) == '{"x": 1}\n'
    assert [p for p in os.listdir(tmp_path / "exp" / "a")] == ["result.json"]  # no temp file left behind
    assert S.children_with(d, "result.json") == [os.path.join(d, "a", "result.json")]
    assert S.glob(d, "experiment_state-*.json") == [os.path.join(d, "experiment_state-2.json")]
    assert S.isdir(S.join(d, "a")) and S.isfile(S.join(d, "b", "other.txt"))
    S.append_text(S.join(d, "q.jsonl"), "1\n")
    S.append_text(S.join(d, "q.jsonl"), "2\n")
    assert S.read_text(S.join(d, "q.jsonl")) == "1\n2\n"
    local = str(tmp_path / "cache" / "refstats" / "r.npz")
    assert S.fetch(S.join(d, "b", "other.txt"), local) == "storage" and open(local).read() == "y"
    assert S.fetch(S.join(d, "b", "other.txt"), local) == "cache"
    assert S.fetch(S.join(d, "missing"), str(tmp_path / "x")) == "" and not os.path.exists(tmp_path / "x")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".fetch-")]  # no temp file left behind
    assert S.download(S.join(d, "a"), str(tmp_path / "copy")) and os.path.isfile(tmp_path / "copy" / "result.json")
    S.remove_tree(S.join(d, "a"))
    assert not S.exists(S.join(d, "a"))


def test_uris_join_with_slashes_and_bad_uris_are_one_line_errors():
    assert S.join("s3://b/p", "name", "x.json") == "s3://b/p/name/x.json"
    assert S.dirname("s3://b/p/name/x.json") == "s3://b/p/name" and S.basename("s3://b/p/t/") == "t"
    assert S.resolve("file:///tmp/x")[1] == "/tmp/x"
    for bad, needle in (("s3://", "no bucket"), ("s3://b/p?endpoint_override=h", "'?options'"),
                        ("s3://b//p", "empty parts")):
        with pytest.raises(UserError, match=needle):
            S.resolve(bad)


def _meta(root):
    return {"paths": {"storage": root, "mlflow_uri": f"sqlite:///{root}/mlflow.db",
                      "optuna_storage": f"sqlite:///{root}/optuna.db", "cache_dir": f"{root}/cache"}}


def test_a_moved_storage_is_re_rooted_and_a_move_into_a_bucket_is_refused(tmp_path):
    d = _meta("/old/place")
    d["paths"]["mlflow_uri"] = "http://tracking:5000"  # a server stays where it is
    _follow_move(d, str(tmp_path))
    assert d["paths"] == {"storage": str(tmp_path), "mlflow_uri": "http://tracking:5000",
                          "optuna_storage": f"sqlite:///{tmp_path}/optuna.db", "cache_dir": f"{tmp_path}/cache"}
    assert d["moved_from"] == "/old/place"
    same = _meta(str(tmp_path))
    os.symlink(tmp_path, tmp_path.parent / (tmp_path.name + "-link"))
    _follow_move(same, str(tmp_path.parent / (tmp_path.name + "-link")))  # the same folder by another name
    assert "moved_from" not in same
    with pytest.raises(UserError, match="cannot live in a bucket"):
        _follow_move(_meta("/old/place"), "s3://bucket/p")
    synced = {"paths": {"storage": "s3://b/p", "mlflow_uri": "http://tracking:5000", "optuna_storage": "",
                        "cache_dir": "s3://b/p/cache"}}
    _follow_move(synced, str(tmp_path))  # a bucket synced to a disk: readable there
    assert synced["paths"]["cache_dir"] == f"{tmp_path}/cache"


def test_credentials_in_urls_are_found_and_where_a_trial_ran_keeps_its_order():
    assert has_credentials("postgresql://u:pw@db/x") and has_credentials("s3://AK:SK@bucket/p")
    assert has_credentials("postgresql://db/x?user=me&password=pw")
    assert not has_credentials("postgresql://me@db/x")  # a user name alone: PGPASSWORD or ~/.pgpass
    assert not has_credentials("postgresql://db/x") and not has_credentials("sqlite:////a/b.db")
    assert not has_credentials(3) and not has_credentials("plain")
    assert _runs_of(["a", "a", "b", "a"]) == ["a", "b", "a"]


def test_the_storage_layout_builds_and_reads_sqlite_uris_in_one_place(tmp_path):
    from sweeps.storage import layout as L

    root = str(tmp_path / "st")
    assert L.mlflow_db_uri(root) == f"sqlite:///{root}/mlflow.db" and L.optuna_db_uri(root).endswith("/optuna.db")
    assert L.sqlite_file(L.mlflow_db_uri(root)) == f"{root}/mlflow.db"
    assert L.sqlite_file("http://127.0.0.1:5000") == "" and L.artifact_root("http://127.0.0.1:5000") is None
    assert L.artifact_root(L.mlflow_db_uri(root)) == f"{root}/mlartifacts"
    assert L.in_storage(L.mlflow_db_uri(root), root) and not L.in_storage(L.mlflow_db_uri(root + "2"), root)
