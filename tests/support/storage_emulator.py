"""A real gcp-storage-emulator process on 127.0.0.1, reached by the real google-cloud-storage client."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tests.support.ports import free_port
from tests.support.processes import stop
from tests.support.waiting import wait_for

EMULATOR = Path(sys.executable).with_name("gcp-storage-emulator")


@dataclass
class StorageEmulator:
    port: int
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_env: dict = field(default_factory=dict)
    data_dir: Path | None = None  # keep objects on disk here, so a restart on the same port finds them

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to read from this emulator (google-cloud-storage's own variable)."""
        return {"STORAGE_EMULATOR_HOST": self.host}

    def start(self) -> "StorageEmulator":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        store = ["--data-dir", str(self.data_dir)] if self.data_dir else []
        memory = [] if self.data_dir else ["--in-memory"]
        self.process = subprocess.Popen(
            [str(EMULATOR), *store, "start", "--host", "127.0.0.1", "--port", str(self.port), *memory, "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(self._answers, 30, what=f"storage emulator on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process:
            stop(self.process)
            self.process = None

    def _answers(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise RuntimeError(f"storage emulator exited with {self.process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def client(self):
        from google.cloud import storage

        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.host
        try:
            return storage.Client(project="test")
        finally:
            if old is None:
                del os.environ["STORAGE_EMULATOR_HOST"]
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old

    def upload(self, bucket: str, name: str, data: bytes | Path) -> int:
        """Put an object; returns its generation. Creates the bucket when needed."""
        client = self.client()
        b = client.bucket(bucket)
        if not b.exists():
            b = client.create_bucket(bucket)
        blob = b.blob(name)
        if isinstance(data, Path):
            blob.upload_from_filename(str(data))
        else:
            blob.upload_from_string(data)
        blob.reload()
        return blob.generation


@contextlib.contextmanager
def storage_emulator(
    port: int | None = None, log_path: Path | None = None, data_dir: Path | None = None
) -> Iterator[StorageEmulator]:
    emulator = StorageEmulator(port or free_port(), log_path=log_path, data_dir=data_dir).start()
    try:
        yield emulator
    finally:
        emulator.stop()
