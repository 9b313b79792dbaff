"""Session-wide servers for the cluster tests (each started once, stopped by its PID at the end)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import S3, MLflowServer  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    s = S3(str(tmp_path_factory.mktemp("moto")))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    m = MLflowServer(str(tmp_path_factory.mktemp("mlflow")), s3)
    yield m
    m.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process reads the bucket as the CLI does (endpoint and credentials from the environment)."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    return s3.env
