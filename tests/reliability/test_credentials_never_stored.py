"""Credentials never travel as storage options (names and values are checked against an
allowlist of non-secret fsspec options), and a secret in the environment, where credentials
belong, lands in no artefact a run writes: store, checkpoints, metrics, TensorBoard events,
Prefect's flow-run parameters, artifacts, logs and database."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.extract_clip import main as extract_main
from model.config import TrainConfig
from model.train import Trainer
from storage import UserError
from storage.options import check_storage_options, parse_storage_options
from tests.flows.test_extract_clip import run
from tests.reliability.conftest import SMALL_RUN

SECRET = "s3cr3t-planted-value"

REFUSED = {
    "authorization header": ({"headers": {"Authorization": f"Bearer {SECRET}"}}, "headers"),
    "user:pass@ endpoint": ({"endpoint_url": f"https://minio:{SECRET}@minio.lab:9000"},
                            "endpoint_url holds a user name or password"),
    "passwd": ({"passwd": SECRET}, "passwd"),
    "auth": ({"auth": ["minio", SECRET]}, "auth"),
    "key and secret": ({"key": "AKIAIOSFODNN7EXAMPLE", "secret": SECRET}, "key, secret"),
    "token": ({"token": SECRET}, "token"),
    "nested aws secret": ({"client_kwargs": {"aws_secret_access_key": SECRET}},
                          "client_kwargs.aws_secret_access_key"),
    "userinfo in a nested endpoint": ({"client_kwargs": {"endpoint_url": f"http://u:{SECRET}@h"}},
                                      "client_kwargs.endpoint_url holds a user name"),
    "proxy with a password": ({"config_kwargs": {"proxies": {"https": f"http://u:{SECRET}@p"}}},
                              "config_kwargs.proxies"),
    "bearer value in an allowed option": ({"profile": f"Bearer {SECRET}"},
                                          "profile holds an Authorization header value"),
    "aws key id in a value": ({"client_kwargs": {"region_name": "AKIAIOSFODNN7EXAMPLE"}},
                              "client_kwargs.region_name holds an AWS access key id"),
    "sse customer key": ({"s3_additional_kwargs": {"SSECustomerKey": SECRET}},
                         "s3_additional_kwargs.SSECustomerKey"),
    "an option not on the list": ({"region_name": "eu-west-1"},
                                  "region_name are not among the non-secret fsspec options .*"
                                  "client_kwargs.region_name"),
    "a wrong type": ({"anon": "yes"}, "anon \\(true/false\\)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_credentials_are_refused_in_names_and_values(case):
    options, named = REFUSED[case]
    with pytest.raises(UserError, match=named) as refused:
        check_storage_options(options)
    message = str(refused.value)
    assert SECRET not in message and "AKIAIOSFODNN7EXAMPLE" not in message  # never echoed
    assert "\n" not in message


def test_the_non_secret_options_users_need_pass():
    check_storage_options({"endpoint_url": "https://minio.lab:9000", "anon": False,
                           "profile": "lab", "client_kwargs": {"region_name": "us-east-1",
                                                               "verify": "/etc/ssl/lab-ca.pem"},
                           "config_kwargs": {"connect_timeout": 5,
                                             "retries": {"max_attempts": 2, "mode": "standard"},
                                             "s3": {"addressing_style": "path"}},
                           "s3_additional_kwargs": {"ServerSideEncryption": "aws:kms",
                                                    "SSEKMSKeyId": "alias/lab"}})
    assert parse_storage_options('{"endpoint_url": "http://127.0.0.1:9000"}') == {
        "endpoint_url": "http://127.0.0.1:9000"}


def prefect_records() -> str:
    """Everything Prefect's API holds about the runs: flow-run parameters, artifacts, logs."""
    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            artifacts = await client.read_artifacts()
            logs = await client.read_logs()
        return ([r.parameters for r in runs], [a.data for a in artifacts],
                [log.message for log in logs])

    return json.dumps(asyncio.run(read()), default=str)


def prefect_database() -> bytes:
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    path = Path(url.split(":///", 1)[1])
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def test_a_planted_secret_lands_in_no_artefact(prefect_api, s3_server, synthetic_root, tmp_path,
                                               monkeypatch, capsys):
    secret = f"{SECRET}-{uuid.uuid4().hex}"
    key_id = "AKIAPLANTED" + uuid.uuid4().hex[:9].upper()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # where credentials belong
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    options = {"endpoint_url": s3_server}
    url = "s3://features/planted/store.zarr"
    summary = run(synthetic_root, url, storage_options=options)
    assert summary["failed"] == []
    out = tmp_path / "run"
    Trainer(TrainConfig(cache="s3://features/planted", storage_options=json.dumps(options),
                        out=str(out), epochs=1, **{**SMALL_RUN, "plot": True})).fit()
    # and the same secret offered as an option is refused before any run is recorded
    offered = json.dumps({"endpoint_url": s3_server, "headers": {"Authorization": f"Bearer {secret}"}})
    code = extract_main(["--root", str(synthetic_root), "--dataset", "synthetic", "--store", url,
                         "--model", "test-ViT-tiny", "--pretrained", "none",
                         "--storage-options", offered])
    err = capsys.readouterr().err
    assert code == 1 and "headers" in err and secret not in err

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    stored = {key: fs.cat(key) for key in fs.find("features/planted")}
    written = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(key.endswith("zarr.json") for key in stored)
    assert {"metrics.jsonl", "last.pt", "curves.png"} <= {Path(p).name for p in written}
    assert any("tfevents" in p for p in written)
    records, database = prefect_records(), prefect_database()
    assert s3_server in records and url in records and database  # what is searched is there
    for value in (secret, key_id):
        for name, data in {**stored, **written}.items():
            assert value.encode() not in data, f"{value} found in {name}"
        assert value not in records
        assert value.encode() not in database
