"""Embeddings that need no model: recipe-mapped columns or DataComp ``<stem>.npz`` files.

Builds the same sidecar tables as the model path (``mmbalance.operators.embed``) and imports no
torch. Also holds the row-fate logic both paths share (which rows are kept, text-only, rejected).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mmbalance.io.source import open_shard
from mmbalance.schemas.contract import REJECTS_SCHEMA, InputError
from mmbalance.schemas.embed import (
    DATACOMP_VARIANTS,
    NpzSpec,
    sidecar_schema,
)

STAGE = "embed"
NORM_TOLERANCE = 2e-3  # fp16 unit vectors are within ~5e-4 of norm 1; beyond this we renormalise


@dataclass
class Half:
    """One modality of a batch: unit rows where ``ok``, and why not elsewhere."""

    values: np.ndarray  # (n, dim) float16; rows that are not ok hold zeros
    ok: np.ndarray  # bool (n,)
    reason: np.ndarray  # object (n,): None where ok


def normalise_rows(matrix: np.ndarray, what: str) -> tuple[Half, int]:
    """Unit-normalise rows (only those off by more than the tolerance). Returns the half and how many
    rows were renormalised; NaN/inf and zero rows are not ok."""
    n = matrix.shape[0]
    m32 = np.asarray(matrix, dtype=np.float32)
    finite = np.isfinite(m32).all(axis=1) if n else np.zeros(0, bool)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.linalg.norm(np.where(finite[:, None], m32, 0), axis=1)
    zero = finite & (norms == 0)
    off = finite & ~zero & (np.abs(norms - 1) > NORM_TOLERANCE)
    ok = finite & ~zero
    out = np.zeros((n, matrix.shape[1]), np.float16)
    good = ok & ~off
    if matrix.dtype == np.float16:
        out[good] = matrix[good]
    else:
        out[good] = m32[good].astype(np.float16)
    if off.any():
        out[off] = (m32[off] / norms[off, None]).astype(np.float16)
    reason = np.full(n, None, dtype=object)
    reason[~finite] = f"{what} holds NaN or inf"
    reason[zero] = f"{what} is all zeros"
    return Half(out, ok, reason), int(off.sum())


def fixed_list(values: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """(n, dim) float16 -> fixed_size_list<float16>[dim], null where ``valid`` is False (zero-copy)."""
    n, dim = values.shape
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float16).reshape(-1), pa.float16())
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


def assemble(
    uids: pa.Array,
    rows: np.ndarray,
    image: Half | None,
    text: Half | None,
    dim: int,
    shard: str,
    on_image_error: str = "reject",
    on_missing_caption: str = "image_only",
    info: dict | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Decide each row's fate and build (sidecar rows, REJECTS_SCHEMA rows).

    A missing half (``None``: the role is not mapped) never rejects a row; a failed half rejects it
    unless the policy keeps the other half; a row with neither half is always rejected.
    """
    n = len(rows)
    img_ok = image.ok if image is not None else np.zeros(n, bool)
    txt_ok = text.ok if text is not None else np.zeros(n, bool)
    keep_without_image = image is None or on_image_error == "text_only"
    keep_without_text = text is None or on_missing_caption == "image_only"
    keep = (img_ok & txt_ok) | (img_ok & keep_without_text) | (txt_ok & keep_without_image)

    reject_reason = np.full(n, None, dtype=object)
    note = np.full(n, None, dtype=object)
    img_reason = image.reason if image is not None else np.full(n, None, dtype=object)
    txt_reason = text.reason if text is not None else np.full(n, None, dtype=object)
    for i in np.flatnonzero(~keep):
        if image is not None and not img_ok[i]:
            reject_reason[i] = img_reason[i]
            if text is not None and not txt_ok[i] and keep_without_image:
                reject_reason[i] = f"{img_reason[i]}; {txt_reason[i]}"
        else:
            reject_reason[i] = txt_reason[i] or "no image or caption to embed"
    for i in np.flatnonzero(keep & ~(img_ok & txt_ok)):
        parts = [r for r, ok, h in ((img_reason[i], img_ok[i], image), (txt_reason[i], txt_ok[i], text))
                 if h is not None and not ok and r]
        note[i] = "; ".join(parts) or None

    kidx = np.flatnonzero(keep)
    take = pa.array(kidx, pa.int64())
    zeros = np.zeros((len(kidx), dim), np.float16)
    img_vals = image.values[kidx] if image is not None else zeros
    txt_vals = text.values[kidx] if text is not None else zeros
    sidecar = pa.table(
        [
            pa.array(rows[kidx], pa.int64()),
            uids.take(take),
            fixed_list(img_vals, img_ok[kidx]),
            fixed_list(txt_vals, txt_ok[kidx]),
            pa.array(note[kidx].tolist(), pa.string()),
        ],
        schema=sidecar_schema(dim, info),
    )
    ridx = np.flatnonzero(~keep)
    rejects = pa.table(
        {
            "uid": uids.take(pa.array(ridx, pa.int64())),
            "shard": pa.array([shard] * len(ridx), pa.string()),
            "row": pa.array(rows[ridx], pa.int64()),
            "stage": pa.array([STAGE] * len(ridx), pa.string()),
            "reason": pa.array(reject_reason[ridx].tolist(), pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )
    return sidecar, rejects


def uid_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr if pa.types.is_string(arr.type) else pc.cast(arr, pa.string())


def matrix_from_list(column: pa.Array | pa.ChunkedArray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) matrix of a list / fixed_size_list column (zero-copy for fixed-size) and its null mask."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    is_null = arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_null(arr.type):
        return np.zeros((n, dim), np.float32), is_null
    if pa.types.is_fixed_size_list(arr.type):
        if arr.type.list_size != dim:
            raise InputError(f"embedding column has dimension {arr.type.list_size}, expected {dim}")
        flat = arr.values.slice(arr.offset * dim, n * dim).to_numpy(zero_copy_only=False)
        return flat.reshape(n, dim), is_null
    filled = arr.fill_null(pa.scalar([0.0] * dim, arr.type)) if is_null.any() else arr
    lengths = pc.list_value_length(filled).to_numpy(zero_copy_only=False)
    if n and (lengths != dim).any():
        raise InputError(f"embedding column has rows of length {int(lengths[lengths != dim][0])}, expected {dim}")
    return filled.flatten().to_numpy(zero_copy_only=False).reshape(n, dim), is_null


def _half_from_column(column, dim: int, what: str) -> Half:
    matrix, is_null = matrix_from_list(column, dim)
    half, _ = normalise_rows(matrix, what)
    half.ok &= ~is_null
    half.reason[is_null] = f"{what} is null"
    return half


def columns_sidecar(
    table: pa.Table,
    uid_column: str,
    image_column: str | None,
    text_column: str | None,
    dim: int,
    shard: str = "",
    row_offset: int = 0,
    info: dict | None = None,
    on_image_error: str = "reject",
    on_missing_caption: str = "image_only",
) -> tuple[pa.Table, pa.Table]:
    """Sidecar rows from the recipe-mapped embedding columns of one batch (already validated)."""
    n = table.num_rows
    image = _half_from_column(table.column(image_column), dim, f"image embedding (column '{image_column}')") \
        if image_column else None
    text = _half_from_column(table.column(text_column), dim, f"text embedding (column '{text_column}')") \
        if text_column else None
    rows = np.arange(row_offset, row_offset + n, dtype=np.int64)
    return assemble(uid_strings(table.column(uid_column)), rows, image, text, dim, shard,
                    on_image_error, on_missing_caption, info)


def columns_info(image_column: str | None, text_column: str | None, dim: int) -> dict:
    return {"source": "columns", "model": None, "pretrained": None, "pretrained_kind": "columns",
            "columns": {"image": image_column, "text": text_column}, "embedding_dim": dim}


# -- DataComp .npz -----------------------------------------------------------------------------


def npz_path_for(shard_path: str, suffix: str = ".npz") -> str:
    """``<dir>/<stem>.npz`` for ``<dir>/<stem>.parquet`` (or ``.tar``, ``.tar.gz``)."""
    base = shard_path.rsplit("/", 1)
    name = base[-1].removesuffix(".gz").rsplit(".", 1)[0] + suffix
    return f"{base[0]}/{name}" if len(base) == 2 else name


def npz_info(spec: NpzSpec) -> dict:
    variant = DATACOMP_VARIANTS[spec.variant]
    image_key, text_key = spec.keys()
    return {"source": "npz", "model": variant["model"], "pretrained": variant["pretrained"], "pretrained_kind": "tag",
            "npz": {"variant": spec.variant, "image_key": image_key, "text_key": text_key},
            "embedding_dim": variant["dim"]}


class NpyMember:
    """Streams rows of one 2-D array stored in an .npz (zip) member, without loading it whole."""

    def __init__(self, archive: zipfile.ZipFile, key: str, where: str):
        name = key if key.endswith(".npy") else f"{key}.npy"
        if name not in archive.namelist():
            keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
            raise InputError(f"{where}: no array '{key}' (arrays: {', '.join(keys)})")
        self.where = f"{where}[{key}]"
        self.stream = archive.open(name)
        try:
            version = np.lib.format.read_magic(self.stream)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = read_header[version](self.stream)
        except ValueError as err:
            raise InputError(f"{self.where}: not a .npy array ({err})") from None
        if dtype.hasobject or dtype.kind != "f" or len(shape) != 2 or (fortran and shape[0] > 1):
            raise InputError(f"{self.where}: expected a C-order 2-D float array, got {dtype} {shape}")
        self.shape, self.dtype = shape, dtype

    def read(self, rows: int) -> np.ndarray:
        nbytes = rows * self.shape[1] * self.dtype.itemsize
        data = self.stream.read(nbytes)
        if len(data) != nbytes:
            raise InputError(f"{self.where}: truncated array data")
        return np.frombuffer(data, dtype=self.dtype).reshape(rows, self.shape[1])

    def close(self) -> None:
        self.stream.close()


def npz_sidecar_batches(
    fs: pafs.FileSystem,
    shard_path: str,
    shard: str,
    spec: NpzSpec,
    uid_column: str,
    batch_rows: int = 16384,
    on_image_error: str = "reject",
    on_missing_caption: str = "image_only",
    verify_checksums: bool = False,
    fmt: str = "auto",
) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Stream a shard's ``.npz`` embeddings as sidecar batches (row counts and dims checked first).
    ``verify_checksums`` checks the shard's page CRCs (``execution.verify_checksums``); an unreadable
    page of its uid column is an input error naming ``shard``."""
    npz = npz_path_for(shard_path, spec.suffix)
    info = npz_info(spec)
    dim = info["embedding_dim"]
    image_key, text_key = spec.keys()
    try:
        npz_file = fs.open_input_file(npz)
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"{shard}: no embeddings file {npz.rsplit('/', 1)[-1]} beside the shard ({err})") from None
    with npz_file, open_shard(fs, shard_path, shard, fmt, verify_checksums) as source:
        try:
            archive = zipfile.ZipFile(npz_file)
        except (zipfile.BadZipFile, pa.ArrowInvalid, OSError, EOFError) as err:
            # a file shorter than the zip trailer fails pyarrow's seek rather than zipfile's check
            raise InputError(f"{npz}: not an .npz file ({str(err).splitlines()[0]})") from None
        with archive:
            num_rows = source.num_rows
            members = [NpyMember(archive, image_key, npz), NpyMember(archive, text_key, npz)]
            for m in members:
                if m.shape[0] != num_rows:
                    raise InputError(f"{m.where}: {m.shape[0]} rows, but {shard} has {num_rows}")
                if m.shape[1] != dim:
                    raise InputError(f"{m.where}: dimension {m.shape[1]}, expected {dim} for variant '{spec.variant}'")
            done = 0
            for batch in source.batches([uid_column], batch_rows):
                n = batch.num_rows
                img, _ = normalise_rows(members[0].read(n), f"image embedding (npz '{image_key}')")
                txt, _ = normalise_rows(members[1].read(n), f"text embedding (npz '{text_key}')")
                rows = np.arange(done, done + n, dtype=np.int64)
                yield assemble(uid_strings(batch.column(0)), rows, img, txt, dim, shard,
                               on_image_error, on_missing_caption, info)
                done += n
            for m in members:
                m.close()
