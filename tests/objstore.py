"""moto's S3 server on loopback: the object store the suite's s3:// lakes live in."""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def moto_s3():
    """Start moto's S3 server on 127.0.0.1 with a bucket ``vlatlas``, export the AWS settings every
    process started meanwhile inherits, and stop it at the end. Yields ``{"uri": "s3://vlatlas",
    "env": the AWS settings}``. moto honours ``If-None-Match: *`` on a put (the live examples' lock)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "vlatlas", "AWS_SECRET_ACCESS_KEY": "vlatlas-secret", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="vlatlas")
        try:
            yield {"uri": "s3://vlatlas", "env": env}
        finally:
            server.stop()
