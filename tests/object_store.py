"""moto's S3 server on loopback, in its own process, for the object-store tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class MotoServer:
    endpoint: str
    log: Path
    process: subprocess.Popen = field(repr=False)

    def requests(self, start: int = 0) -> list[str]:
        """Request lines ("PUT /bucket/key") logged since line ``start``."""
        lines = self.log.read_text(errors="replace").splitlines()[start:]
        out = []
        for line in lines:
            if '"' in line:
                parts = line.split('"')[1].split(" ")
                if len(parts) >= 2:
                    out.append(f"{parts[0]} {parts[1]}")
        return out

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()


def start_moto(directory: Path) -> MotoServer:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = directory / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    handle = open(log, "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=handle, stderr=subprocess.STDOUT,
                            env={**os.environ, **CREDENTIALS})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    return MotoServer(endpoint, log, proc)


def make_bucket(server: MotoServer, name: str) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=server.endpoint.split("://")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir(name)


def upload_dir(server: MotoServer, local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=server.endpoint.split("://")[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing")
    pafs.copy_files(str(local), uri.removeprefix("s3://"), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
