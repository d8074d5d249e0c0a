"""Shard discovery and inspection: stable shard ids, footers read and checked before any work."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mmbalance.io.source import READ_ERRORS, TAR_SUFFIXES, open_shard, read_source, shard_info, unreadable
from mmbalance.io.store import resolve_filesystem
from mmbalance.schemas.contract import InputError, ShardLayout, check_shard_schema
from mmbalance.schemas.recipe import Recipe


@dataclass(frozen=True)
class Shard:
    index: int  # position in the sorted shard list: the tie-breaker for duplicate uids
    relpath: str  # relative to the input root, '/'-separated
    path: str  # path inside the filesystem
    size: int
    shard_id: str  # stable: from relpath and size, never from Ray's block layout
    num_rows: int = -1
    format: str = "parquet"  # how it is read: parquet | webdataset

    def to_dict(self) -> dict:
        return asdict(self)


def shard_id_for(relpath: str, size: int) -> str:
    digest = hashlib.sha1(f"{relpath}\0{size}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", relpath.rsplit(".", 1)[0])[-80:]
    return f"{stem}-{digest}"


def discover_shards(uri: str, extensions: list[str] | tuple[str, ...] = (".parquet",),
                    fmt: str = "auto") -> tuple[pafs.FileSystem, list[Shard]]:
    """List the shards under ``uri`` (recursively), sorted by relative path. ``fmt`` auto: a directory
    holding tars is a WebDataset corpus (a Parquet file named like a tar is its side table, any other
    is an error), else a Parquet corpus of ``extensions``."""
    fs, root = resolve_filesystem(uri)
    try:
        info = fs.get_file_info(root)
    except OSError as err:
        raise InputError(f"{uri}: cannot access input ({err})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: input path does not exist")
    suffixes = tuple(extensions) if fmt == "parquet" else tuple(dict.fromkeys([*extensions, *TAR_SUFFIXES]))
    if info.type == pafs.FileType.File:
        entries, root_dir = [info], root.rsplit("/", 1)[0]
    elif isinstance(fs, pafs.LocalFileSystem):
        entries, root_dir = _walk_local(root, suffixes), root
    else:
        try:
            entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        except OSError as err:
            raise InputError(f"{uri}: cannot list input directory ({err})") from None
        root_dir = root
    files = []
    for entry in entries:
        if entry.type != pafs.FileType.File or not entry.base_name.endswith(suffixes):
            continue
        rel = entry.path[len(root_dir) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # hidden files, _SUCCESS markers, temporaries
        files.append((rel, entry.path, entry.size))
    files = _of_one_format(sorted(files), tuple(extensions), fmt)
    if not files:
        what = "WebDataset tars" if fmt == "webdataset" else f"Parquet files ({', '.join(extensions)})"
        raise InputError(f"{uri}: no {what} found")
    kind = "webdataset" if files[0][0].endswith(TAR_SUFFIXES) else "parquet"
    shards = [Shard(i, rel, path, size, shard_id_for(rel, size), format=kind) for i, (rel, path, size) in enumerate(files)]
    return fs, shards


def _of_one_format(files: list[tuple[str, str, int]], extensions: tuple[str, ...], fmt: str):
    """The shards of the corpus's format: with tars present (or ``fmt`` webdataset) the tars, their
    same-stem Parquet files being side tables; otherwise the files with ``extensions``."""
    tars = [f for f in files if f[0].endswith(TAR_SUFFIXES)]
    if fmt == "parquet" or (fmt == "auto" and not tars):
        return [f for f in files if f[0].endswith(extensions) and not f[0].endswith(TAR_SUFFIXES)]
    if fmt == "auto":
        stems = {_stem(f[0]) for f in tars}
        stray = [f for f in files if not f[0].endswith(TAR_SUFFIXES) and f[0].endswith(".parquet") and _stem(f[0]) not in stems]
        if stray:
            raise InputError(f"{stray[0][0]}: a Parquet file in a directory of WebDataset tars, and not a side table of a "
                             f"tar (no {_stem(stray[0][0])}.tar); set input.format (parquet or webdataset) to read one kind")
    return tars


def _stem(relpath: str) -> str:
    for suffix in (*TAR_SUFFIXES, ".parquet"):
        if relpath.endswith(suffix):
            return relpath[: -len(suffix)]
    return relpath


def _walk_local(root: str, extensions: tuple[str, ...]) -> list[pafs.FileInfo]:
    """Files under a local directory, following symlinks but refusing loops (pyarrow's listing
    follows a loop ~40 levels deep and silently drops a file that links to itself)."""
    out: list[pafs.FileInfo] = []
    seen: set[tuple[int, int]] = set()

    def visit(directory: str) -> None:
        st = os.stat(directory)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            rel = os.path.relpath(directory, root)
            raise InputError(f"{rel}: symlink loop (a directory link back to {os.path.realpath(directory)})")
        seen.add(key)
        try:
            names = sorted(os.listdir(directory))
        except OSError as err:
            raise InputError(f"{os.path.relpath(directory, root)}: cannot list directory ({err.strerror})") from None
        for name in names:
            if name.startswith((".", "_")):  # hidden files, _SUCCESS markers, temporaries
                continue
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                visit(path)
            elif name.endswith(extensions):
                try:
                    size = os.stat(path).st_size
                except OSError as err:  # e.g. a link to itself (ELOOP) or a dangling link
                    kind = "symlink loop" if os.path.islink(path) else "unreadable"
                    raise InputError(f"{os.path.relpath(path, root)}: {kind} ({err.strerror})") from None
                out.append(pafs.FileInfo(path, pafs.FileType.File, size=size))

    visit(root)
    return out


def effective_recipe(fs: pafs.FileSystem, shards: list[Shard], recipe: Recipe) -> Recipe:
    """The recipe as the input's format reads it: for tars the sample key is the uid and img2dataset's
    status is checked (when the first shard has one), unless the recipe maps those roles itself."""
    kind = shards[0].format if shards else "parquet"
    present: tuple[str, ...] = ()
    if kind == "webdataset":
        with open_shard(fs, shards[0].path, shards[0].relpath, kind) as first:  # its columns, not its rows
            present = tuple(first.schema.names)
    return recipe.for_format(kind, present)


@dataclass
class InspectedShard:
    shard: Shard
    layout: ShardLayout
    schema: pa.Schema


def _inspect_one(fs: pafs.FileSystem, shard: Shard, recipe: Recipe) -> InspectedShard:
    schema, num_rows = shard_info(fs, shard.path, shard.relpath, shard.format)
    layout = check_shard_schema(schema, recipe, shard.relpath)
    inspected = Shard(shard.index, shard.relpath, shard.path, shard.size, shard.shard_id, num_rows, shard.format)
    return InspectedShard(inspected, layout, schema)


def inspect_shards(fs: pafs.FileSystem, shards: list[Shard], recipe: Recipe, threads: int = 16) -> list[InspectedShard]:
    """Read every footer and check every schema before any work starts; the first error stops the run."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda s: _safe_inspect(fs, s, recipe), shards))
    errors = [r for r in results if isinstance(r, InputError)]
    if errors:
        more = f" (and {len(errors) - 1} more bad shards)" if len(errors) > 1 else ""
        raise InputError(f"{errors[0]}{more}")
    inspected = [r for r in results if isinstance(r, InspectedShard)]
    _check_consistent_dims(inspected, recipe)
    check_export_columns(recipe, inspected)
    return inspected


def _safe_inspect(fs, shard, recipe):
    try:
        return _inspect_one(fs, shard, recipe)
    except InputError as err:
        return err


def _check_consistent_dims(inspected: list[InspectedShard], recipe: Recipe) -> None:
    for role in ("image_embedding", "text_embedding"):
        column = getattr(recipe.input.columns, role)
        if not column:
            continue
        expected, first = recipe.input.embedding_dim, "input.embedding_dim"
        for item in inspected:
            dim = item.layout.embedding_dims.get(column)
            if dim is None:
                continue
            if expected is None:
                expected, first = dim, item.shard.relpath
            elif dim != expected:
                raise InputError(
                    f"{item.shard.relpath}: column '{column}' has dimension {dim}, but {first} has {expected}"
                )


DIM_SAMPLE_ROWS = 10_000  # non-null rows of the first shard whose list lengths elect the dimension


def expected_embedding_dim(fs: pafs.FileSystem, inspected: list[InspectedShard], column: str, recipe: Recipe) -> int:
    """The corpus-wide dimension of an embedding column: ``input.embedding_dim``, a fixed_size_list
    type, or else the length most of the first ``DIM_SAMPLE_ROWS`` non-null rows of the first shard
    with any share (never one row: a short first row must not reject the rest of the corpus)."""
    if recipe.input.embedding_dim:
        return recipe.input.embedding_dim
    for item in inspected:
        dim = item.layout.embedding_dims.get(column)
        if dim is not None:
            return dim
    for item in inspected:
        lengths = _first_lengths(fs, item, column, DIM_SAMPLE_ROWS, recipe.execution.verify_checksums)
        if not len(lengths):
            continue
        values, counts = np.unique(lengths, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        if counts[order[0]] * 2 <= len(lengths):
            shares = ", ".join(f"{values[i]} values: {counts[i]}" for i in order[:3])
            raise InputError(
                f"{item.shard.relpath}: column '{column}' has no majority embedding length in its first "
                f"{len(lengths)} rows ({shares}); set input.embedding_dim"
            )
        return int(values[order[0]])
    raise InputError(f"column '{column}': every row is null, cannot tell the embedding dimension")


def _first_lengths(fs: pafs.FileSystem, item: InspectedShard, column: str, limit: int, verify: bool) -> np.ndarray:
    """List lengths of up to ``limit`` non-null rows from the start of a shard."""
    if pa.types.is_null(item.schema.field(column).type):
        return np.zeros(0, np.int64)
    parts, seen = [], 0
    shard = item.shard
    try:
        for table in read_source(fs, shard.path, shard.relpath, [column], min(limit, 4096), shard.format, verify):
            lengths = pc.list_value_length(table.column(0)).drop_null().to_numpy(zero_copy_only=False)
            parts.append(lengths[: limit - seen])
            seen += len(parts[-1])
            if seen >= limit:
                break
    except READ_ERRORS as err:
        raise unreadable(shard.relpath, err) from None
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def check_export_columns(recipe: Recipe, inspected: list[InspectedShard]) -> None:
    """Every export format that reads captions and images from the source shards can find them in
    every shard: checked before any work, not after the whole run."""
    from mmbalance.operators.export import FORMATS

    needing = [f for f in recipe.export.formats if f != "parquet" and getattr(FORMATS.get(f), "needs_source", False)]
    if not needing or not inspected:
        return
    name, opts, cols = needing[0], recipe.export, recipe.input.columns
    first_names = inspected[0].schema.names
    wanted = {
        "caption": (opts.caption_column or cols.caption, "input.columns.caption or export.caption_column"),
        # as the exporter resolves it: the mapped column, else one named 'image' in the first shard
        "image": (opts.image_column or cols.image or ("image" if "image" in first_names else None),
                  "input.columns.image or export.image_column (or give the shards an 'image' column)"),
    }
    for role, (column, how) in wanted.items():
        if not column:
            raise InputError(f"export.formats: {name} needs the {role} of every row; set {how}")
        for item in inspected:
            if item.schema.get_field_index(column) < 0:
                raise InputError(f"{item.shard.relpath}: no column '{column}', which export.formats: {name} reads as the {role}")


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_local_out(out_uri: str, path: str, create: bool = False) -> None:
    """A local OUT must be a directory, or creatable as one: what is wrong with the path, in one line
    (exit 2), instead of an errno from deep inside the run. ``create`` makes it (the run does, just
    before taking the lock; ``--plan`` only checks)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{out_uri}: exists and is a file, not a directory; choose another --out")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise InputError(f"{out_uri}: cannot create the run directory there: {existing} is a file, not a directory")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise InputError(f"{out_uri}: cannot create the run directory there: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{out_uri}: cannot create the run directory there: {existing} is not writable")
    if create:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise InputError(f"{out_uri}: cannot create the run directory there ({err.strerror or err}); "
                             "choose an --out on a writable filesystem") from None


def check_output_location(input_uri: str, out_uri: str) -> None:
    """Refuse an OUT inside the input directory (the next run would read OUT's Parquet files as
    input shards) unless discovery skips it (a path part starting with '.' or '_', e.g.
    corpus/_runs/r1), and an input inside OUT (``--overwrite`` would delete it)."""
    in_fs, in_path = resolve_filesystem(input_uri)
    out_fs, out_path = resolve_filesystem(out_uri)
    if isinstance(out_fs, pafs.LocalFileSystem):
        check_local_out(out_uri, out_path)
    if in_fs.type_name != out_fs.type_name:
        return
    if isinstance(in_fs, pafs.LocalFileSystem):
        in_path, out_path = os.path.realpath(in_path), os.path.realpath(out_path)
    in_path, out_path = in_path.rstrip("/") or "/", out_path.rstrip("/") or "/"
    if _is_inside(in_path, out_path):
        raise InputError(f"{input_uri}: the input is inside the output directory {out_uri}; choose an --out "
                         "that does not contain the input")
    if in_fs.get_file_info(in_path).type != pafs.FileType.Directory or not _is_inside(out_path, in_path):
        return
    relative = out_path[len(in_path):].strip("/").split("/")
    if not any(part.startswith((".", "_")) for part in relative):
        raise InputError(f"{out_uri}: the output directory is inside the input {input_uri}, so its Parquet files "
                         "would be read as input shards; choose an --out outside the input (or under a "
                         "directory whose name starts with '_', which discovery skips)")
