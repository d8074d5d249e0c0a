"""What a rerun redoes beyond the unfinished units: damaged outputs and what read them, and the
units a grown or changed corpus affects (``rebalance --update``).

Both are derived from the stage declarations (``downstream``): a unit whose output no longer
matches its done marker is redone with every unit that read that output, directly or through
others (a damaged ``fit/sample.parquet``: fit, assign, signatures, solve, weigh); an added, changed
or removed shard redoes its own units and what reads them (dedup, the fit and the solve read every
shard's outputs, so every unit after them follows). Downstream markers are deleted first and the
damaged unit's own marker last, so a run killed half-way through finds the same work again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc

from mmbalance.io.store import OUTPUTS_KEY, RunStore, UnitCheck
from mmbalance.pipeline.stage import GlobalStage, Stage
from mmbalance.schemas.recipe import Recipe

ALL = "*"  # every unit of a stage


def readers_of(stage_name: str) -> list[tuple[Stage, bool]]:
    """The stages that read what ``stage_name`` writes, each with True when a unit reads only the
    same shard's files (a shard stage reading another's output for its own shard), False when it
    reads every unit's."""
    from mmbalance.pipeline.stages import BY_NAME, STAGES

    writer = BY_NAME[stage_name]
    written = {id(o) for o in writer.writes}
    out: list[tuple[Stage, bool]] = []
    for reader in STAGES:
        reads = [r for r in reader.output_reads() if id(r.output) in written]
        if reader.name != stage_name and reads:
            out.append((reader, all(not r.every and reader.unit == writer.unit == "shard" for r in reads)))
    return out


def downstream(units: list[tuple[str, str]], recipe: Recipe) -> dict[str, set[str]]:
    """Every unit that read, directly or through others, what the ``units`` ((stage, key)) wrote,
    derived from the declared reads and writes: {stage: {keys} or {ALL}}. A redone unit rewrites all
    its outputs, so all of them count. The given units themselves are not included."""
    from mmbalance.pipeline.stages import active_stages

    active = {s.name for s in active_stages(recipe)}
    found: dict[str, set[str]] = {}
    todo = list(units)
    while todo:
        stage_name, key = todo.pop()
        for reader, same in readers_of(stage_name):
            if reader.name not in active:
                continue
            if isinstance(reader, GlobalStage):
                target = reader.done_key
                if target is None:
                    continue  # rewritten by every run (export, html)
            else:
                target = key if same else ALL
            have = found.setdefault(reader.name, set())
            if ALL in have or target in have:
                continue
            have.add(target)
            todo.append((reader.name, target))
    return found


@dataclass
class Damage:
    stage: str
    key: str
    file: str  # relative to OUT
    reason: str

    def line(self, store: RunStore) -> str:
        return f"{self.stage} {self.key}: {store.path(self.file)} is damaged ({self.reason})"


def damages(stage: str, checks: dict[str, UnitCheck]) -> list[Damage]:
    """One entry per damaged output of the units checked."""
    return [Damage(stage, k, file, why) for k, c in sorted(checks.items()) for file, why in c.damaged]


def affected(units: list[tuple[str, str]], recipe: Recipe) -> dict[str, set[str]]:
    """The units downstream of ``units`` ((stage, key)), and those units themselves."""
    closure = downstream(units, recipe)
    for stage_name, key in units:
        closure.setdefault(stage_name, set()).add(key)
    return closure


def invalidate(store: RunStore, recipe: Recipe, damaged: list[Damage]) -> dict[str, set[str]]:
    """Delete the done markers of every unit downstream of the damaged outputs, then of the damaged
    units themselves: the stages redo them as unfinished work."""
    units = sorted({(d.stage, d.key) for d in damaged})
    closure = downstream(units, recipe)
    forget_units(store, closure)
    for d in damaged:  # last: a run killed before this finds the damage, and so all of this, again
        store.forget(d.stage, d.key)
    return closure


def forget_units(store: RunStore, closure: dict[str, set[str]]) -> None:
    for stage_name, keys in closure.items():
        if ALL in keys:
            if store.exists("_done", stage_name):
                store.fs.delete_dir(store.path("_done", stage_name))
            continue
        for key in keys:
            store.forget(stage_name, key)


# -- a corpus that grows: rebalance --update ---------------------------------------------------------


@dataclass
class InputChanges:
    """Shards added, changed (same path, other content) and removed since the run's shards.json."""

    added: list[str] = field(default_factory=list)  # relpaths
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def first(self) -> tuple[str, str]:
        """(relpath, 'added' | 'changed' | 'removed') of the first change by path."""
        kinds = [(r, "added") for r in self.added] + [(r, "changed") for r in self.changed] + [(r, "removed") for r in self.removed]
        return min(kinds)

    def count(self) -> int:
        return len(self.added) + len(self.changed) + len(self.removed)

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" for k, v in (("added", self.added), ("changed", self.changed), ("removed", self.removed)) if v]
        return ", ".join(parts)


def input_changes(previous: list[dict[str, Any]], current: dict[str, str]) -> InputChanges:
    """Compare the fingerprints a run recorded ({relpath, fingerprint} entries) with the input's now."""
    before = {s["relpath"]: s.get("fingerprint") for s in previous}
    out = InputChanges()
    for rel in sorted(set(before) | set(current)):
        if rel not in before:
            out.added.append(rel)
        elif rel not in current:
            out.removed.append(rel)
        elif before[rel] != current[rel]:
            out.changed.append(rel)
    return out


def shard_stages() -> list[Stage]:
    from mmbalance.pipeline.stages import STAGES

    return [s for s in STAGES if s.unit == "shard"]


def drop_shard(store: RunStore, shard_id: str) -> None:
    """Delete every output and marker of a shard that left the corpus (or whose id changed)."""
    for declared in shard_stages():
        for pattern in (o.pattern for o in declared.writes):
            head, _, tail = pattern.partition("{label}/")
            if tail:  # entries/{label}/{shard}.parquet: one file per label directory
                dirs = [f"{head}{d}/" for d in _subdirs(store, head.rstrip("/"))]
                paths = [d + tail.replace("{shard}", shard_id) for d in dirs]
            else:
                paths = [pattern.replace("{shard}", shard_id)]
            for relative in paths:
                if store.exists(relative):
                    store.fs.delete_file(store.path(relative))
        store.forget(declared.name, shard_id)
        if store.exists("_failed", declared.name, f"{shard_id}.json"):
            store.fs.delete_file(store.path("_failed", declared.name, f"{shard_id}.json"))


def _subdirs(store: RunStore, relative: str) -> list[str]:
    import pyarrow.fs as pafs

    if not store.exists(relative):
        return []
    infos = store.fs.get_file_info(pafs.FileSelector(store.path(relative)))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def update_units(previous: list[dict[str, Any]], shards, changes: InputChanges) -> tuple[list[str], list[tuple[str, str]]]:
    """(old shard ids to drop, scan units whose change the rest of the run must follow)."""
    old_ids = {s["relpath"]: s["shard_id"] for s in previous}
    new_ids = {s.relpath: s.shard_id for s in shards}
    drop = [old_ids[r] for r in changes.removed]
    drop += [old_ids[r] for r in changes.changed if old_ids[r] != new_ids[r]]  # another size: another id
    moved = [old_ids[r] for r in changes.removed + changes.changed] + [new_ids[r] for r in changes.added + changes.changed]
    return drop, [("scan", sid) for sid in sorted(set(moved))]


def apply_update(store: RunStore, recipe: Recipe, previous: list[dict[str, Any]], shards, changes: InputChanges) -> dict[str, set[str]]:
    """Bring OUT to the state a fresh run over the new input would resume from: the removed shards'
    outputs deleted, the changed shards' units and everything downstream of any change forgotten
    (the unchanged shards' candidates are then narrowed, see narrow_samples)."""
    drop, units = update_units(previous, shards, changes)
    closure = affected(units, recipe)
    forget_units(store, closure)
    for shard_id in drop:
        drop_shard(store, shard_id)
    return closure


def narrow_samples(store: RunStore, shard_ids: list[str], threshold: int | None) -> int:
    """A grown corpus keeps fewer fit-sample candidates per shard (a lower priority threshold): cut
    each finished scan's candidates to it instead of rescanning the shard. The rows kept are exactly
    those a fresh scan keeps, written the same way (``write_sample``), so the files are identical.
    A higher threshold (a shrunk corpus) cannot be narrowed to: those scans are redone. Returns how
    many shards were narrowed."""
    from mmbalance.pipeline.stages.scan import write_sample

    if threshold is None:
        return 0
    narrowed = 0
    for shard_id in shard_ids:
        marker = store.read_marker("scan", shard_id)
        recorded = (marker or {}).get("sample_threshold")
        if not isinstance(recorded, int) or recorded <= threshold or store.check_unit("scan", shard_id).status != "done":
            continue
        outputs = dict(marker.pop(OUTPUTS_KEY))
        relative = f"sample/{shard_id}.parquet"
        sampled = 0
        store.take_written()
        if relative in outputs:
            table = store.read_table("sample", f"{shard_id}.parquet")
            table = table.filter(pc.less_equal(table.column("priority"), threshold))
            del outputs[relative]
            sampled = write_sample(store, shard_id, table)  # replaces the file (a fresh scan writes none if empty)
            if not sampled:
                store.fs.delete_file(store.path(relative))
            outputs.update(store.take_written())
        store.mark_done("scan", shard_id, {**marker, "sample_threshold": threshold, "sampled": sampled}, outputs)
        narrowed += 1
    return narrowed
