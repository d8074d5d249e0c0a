"""Exports to an object store: every file is written on the local disk first (a tar, an image, a
JSONL) and uploaded whole once it is complete, by a pool of upload threads while the next files
are written: one PUT per file (pyarrow's delayed open), a multipart upload for a large one; never a
request per write, a rename (copy + delete) or a read-back. Local disk holds only the files still
waiting for their upload (at most ``MAX_PENDING``)."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs

from mmbalance.io.store import RunStore

UPLOAD_THREADS = 32  # many small files: requests in flight, not bandwidth, bound the time
MAX_PENDING = 128
COPY_CHUNK = 8 << 20


class Uploader:
    """Uploads finished local files to ``root`` on ``fs``, deleting each local copy once uploaded."""

    def __init__(self, fs: pafs.FileSystem, root: str, threads: int = UPLOAD_THREADS):
        self.fs, self.root = fs, root.rstrip("/")
        if pa.io_thread_count() < threads:  # pyarrow sends every PUT from its IO pool (8 threads by default)
            pa.set_io_thread_count(threads)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mmbalance-upload")
        self.slots = threading.BoundedSemaphore(MAX_PENDING)
        self.futures: list[Future] = []
        self.uploaded = 0
        self.bytes = 0
        self._count = threading.Lock()

    def submit(self, local: str, relative: str) -> None:
        self.slots.acquire()  # back-pressure: the writer waits when uploads fall behind
        try:
            self.futures.append(self.pool.submit(self._upload, local, f"{self.root}/{relative}"))
        except BaseException:
            self.slots.release()
            raise
        self._raise_first_error(done_only=True)

    def _upload(self, local: str, remote: str) -> None:
        try:
            size = os.path.getsize(local)
            try:
                with open(local, "rb") as src, self.fs.open_output_stream(remote) as dst:
                    shutil.copyfileobj(src, dst, COPY_CHUNK)
            except OSError as err:  # pyarrow's errors name the key, not what was being done
                raise OSError(err.errno, f"uploading {remote}: {(str(err).splitlines() or [''])[0]}") from err
            os.remove(local)
            with self._count:
                self.uploaded += 1
                self.bytes += size
        finally:
            self.slots.release()

    def _raise_first_error(self, done_only: bool) -> None:
        for f in self.futures:
            if (f.done() or not done_only) and f.exception() is not None:
                raise f.exception()
        if done_only:
            self.futures = [f for f in self.futures if not f.done()]

    def finish(self) -> None:
        """Wait for every upload; the first failure is raised (naming the remote file)."""
        try:
            self._raise_first_error(done_only=False)
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True)


class UploadingStore(RunStore):
    """A RunStore on a local staging directory whose finished files go to an ``Uploader``."""

    def __init__(self, local_root: str, uploader: Uploader):
        super().__init__(local_root)
        self.uploader = uploader

    def finished(self, relative: str) -> None:
        self.written.pop(relative, None)
        self.uploader.submit(self.path(relative), relative)
