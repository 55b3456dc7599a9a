"""A real S3-compatible endpoint on 127.0.0.1 (moto's server), for the demo and the tests.

With ``enforce_auth`` the server checks every request's signature against access keys created
through its IAM API, so wrong keys fail exactly as they would against AWS or MinIO.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)

REGION = "us-east-1"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str

    def env(self, endpoint_url: str) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_ENDPOINT_URL_S3": endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalS3:
    """Start with ``start()``; ``endpoint_url`` and ``credentials`` say how to reach it."""

    def __init__(self, port: int | None = None, enforce_auth: bool = True) -> None:
        self.port = port or free_port()
        self.enforce_auth = enforce_auth
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.credentials = Credentials("testing", "testing")
        self._server = None

    def start(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        if self.enforce_auth:
            self.credentials = self._create_user("coughreg")
            self._post("/moto-api/reset-auth", b"0")  # from now on every request must be signed by a known key
        log.info("local S3 endpoint at %s (auth %s)", self.endpoint_url, "enforced" if self.enforce_auth else "off")
        return self

    def _post(self, path: str, body: bytes) -> dict:
        request = urllib.request.Request(
            self.endpoint_url + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def _create_user(self, name: str) -> Credentials:
        import boto3

        iam = boto3.client(
            "iam", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def client(self, credentials: Credentials | None = None):
        import boto3

        credentials = credentials or self.credentials
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=credentials.access_key_id, aws_secret_access_key=credentials.secret_access_key,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
