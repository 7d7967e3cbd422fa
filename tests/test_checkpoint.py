"""Checkpoints that never go backwards: lines and pruning, rollbacks set aside, atomic re-saves,
leftovers of crashes, one resume decision for every rank, and a head that reads only the shard
files it needs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import pm_dist.checkpoint as ckpt_mod
from pm_dist.checkpoint import (CheckpointError, check_loaded, clean_leftovers, read_meta, resolve,
                                save_checkpoint)


class FakeEngine:
    """What save_checkpoint asks of a DeepSpeed engine: one file per call (rank 0 writes it)."""

    def __init__(self, value=0):
        self.value = value

    def save_checkpoint(self, path, tag, save_latest):
        from pm_dist.distributed import get_rank
        os.makedirs(os.path.join(path, tag), exist_ok=True)
        if get_rank() == 0:
            torch.save({"w": torch.full((4,), float(self.value))},
                       os.path.join(path, tag, "mp_rank_00_model_states.pt"))


def _save(root, step, parent=None, keep=10, value=None):
    path, ckpt_id = save_checkpoint(root, step, FakeEngine(step if value is None else value),
                                    {"head": {"x": step}}, {"rng": step}, {"world_size": 1},
                                    keep=keep, parent=parent)
    return path, ckpt_id


def _names(root):
    return sorted(p.name for p in Path(root).glob("step_*"))


def test_save_records_id_parent_and_verifies(tmp_path):
    path, first = _save(tmp_path, 1)
    _, second = _save(tmp_path, 2, parent=first)
    meta = read_meta(tmp_path / "step_00000002")
    assert meta["id"] == second and meta["parent"] == first and meta["step"] == 2
    assert set(meta["files"]) == {"engine/ds/mp_rank_00_model_states.pt", "head_rank0.pt",
                                  "state_rank0.pt"}
    assert torch.load(path / "head_rank0.pt")["checkpoint_id"] == first


def test_rollback_keeps_its_line_and_sets_newer_ones_aside(tmp_path):
    ids = [None]
    for step in (100, 200, 400, 600):  # the abandoned run
        ids.append(_save(tmp_path, step, parent=ids[-1], keep=10)[1])
    logs = []
    ckpt, meta = resolve(tmp_path, str(tmp_path / "step_00000200"), log=logs.append)
    assert meta["step"] == 200 and ckpt.name == "step_00000200"
    assert _names(tmp_path) == ["step_00000100", "step_00000200"]
    [aside] = list(tmp_path.glob("aside-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000400", "step_00000600"]  # kept
    assert any("moved 2 checkpoint(s) newer than step 200" in line for line in logs)
    # the rollback's line: 300, 500 with keep=2 prunes only its own line (200, and 100 its parent)
    _, a = _save(tmp_path, 300, parent=meta["id"], keep=2)
    _, b = _save(tmp_path, 500, parent=a, keep=2)
    assert _names(tmp_path) == ["step_00000300", "step_00000500"]
    ckpt, meta = resolve(tmp_path, "auto", log=logs.append)  # a requeue continues the rollback
    assert meta["id"] == b


def test_prune_never_touches_another_line(tmp_path):
    _save(tmp_path, 1)  # a line of its own
    _, a = _save(tmp_path, 2)  # a second line
    _, b = _save(tmp_path, 3, parent=a, keep=1)
    assert _names(tmp_path) == ["step_00000001", "step_00000003"]


def test_resaving_a_step_keeps_the_line_connected(tmp_path):
    """A finished run resumed saves its last step again, with that step as its parent: the re-save
    takes over the replaced one's parent, so later saves still prune the older ones of the line."""
    ids = [None]
    for step in (1, 2, 3):
        ids.append(_save(tmp_path, step, parent=ids[-1], keep=2)[1])
    assert _names(tmp_path) == ["step_00000002", "step_00000003"]
    _, again = _save(tmp_path, 3, parent=ids[3], keep=2)
    assert read_meta(tmp_path / "step_00000003")["parent"] == ids[2]
    assert _names(tmp_path) == ["step_00000002", "step_00000003"]
    _, last = _save(tmp_path, 4, parent=again, keep=2)
    assert _names(tmp_path) == ["step_00000003", "step_00000004"]  # step 2 pruned, none leaks
    assert [p.name for p in ckpt_mod._line(tmp_path, last)] == _names(tmp_path)


def test_auto_passes_over_damaged_newer_and_sets_it_aside(tmp_path):
    _, a = _save(tmp_path, 1)
    _save(tmp_path, 2, parent=a)
    (tmp_path / "step_00000002" / "meta.json").unlink()  # killed before meta.json? still damaged
    logs = []
    ckpt, meta = resolve(tmp_path, "auto", log=logs.append)
    assert meta["id"] == a
    assert _names(tmp_path) == ["step_00000001"] and list(tmp_path.glob("aside-*/step_00000002"))
    assert any("passing over" in line for line in logs)


def test_auto_refuses_when_no_checkpoint_verifies_unless_told(tmp_path):
    _save(tmp_path, 1)
    head = tmp_path / "step_00000001" / "head_rank0.pt"
    head.write_bytes(head.read_bytes()[:-3] + b"xyz")  # same size, other content
    with pytest.raises(CheckpointError, match="none verifies.*auto-or-fresh"):
        resolve(tmp_path, "auto", log=lambda _: None)
    assert _names(tmp_path) == ["step_00000001"]  # nothing moved on refusal
    assert resolve(tmp_path, "auto-or-fresh", log=lambda _: None) == (None, None)
    assert _names(tmp_path) == []  # set aside, not deleted: a fresh line starts
    assert list(tmp_path.glob("aside-*/step_00000001/head_rank0.pt"))
    assert resolve(tmp_path / "nothing", "auto", log=lambda _: None) == (None, None)


def test_explicit_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "step_00000001" / "state_rank0.pt").write_bytes(b"bad")
    with pytest.raises(CheckpointError, match="state_rank0.pt is damaged"):
        resolve(tmp_path, str(tmp_path / "step_00000001"), log=lambda _: None)


def test_resave_replaces_atomically(tmp_path, monkeypatch):
    _save(tmp_path, 5, value=1)
    # a kill between "rename the old one aside" and "rename the new one in" ...
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 5, value=2)
    monkeypatch.setattr(ckpt_mod.os, "replace", real_replace)
    assert calls[0] == ("step_00000005", ".old-step_00000005")
    assert not (tmp_path / "step_00000005").exists()
    # ... leaves the old checkpoint whole beside; the next start puts it back and removes the tmp
    logs = []
    ckpt, meta = resolve(tmp_path, "auto", log=logs.append)
    assert ckpt.name == "step_00000005" and not list(tmp_path.glob(".*"))
    assert torch.load(ckpt / "engine/ds/mp_rank_00_model_states.pt")["w"][0] == 1
    # an uninterrupted re-save replaces it and leaves nothing behind
    _save(tmp_path, 5, value=3)
    assert torch.load(tmp_path / "step_00000005/engine/ds/mp_rank_00_model_states.pt")["w"][0] == 3
    assert not list(tmp_path.glob(".*"))


def test_stale_temporaries_are_cleaned_at_start(tmp_path):
    (tmp_path / ".tmp-step_00000007" / "engine").mkdir(parents=True)
    _save(tmp_path, 3)
    old = tmp_path / ".old-step_00000003"
    old.mkdir()
    logs = []
    clean_leftovers(tmp_path, log=logs.append)
    assert not list(tmp_path.glob(".*")) and _names(tmp_path) == ["step_00000003"]
    assert any(".tmp-step_00000007" in line for line in logs)


def test_check_loaded_refuses_a_file_of_another_checkpoint(tmp_path):
    check_loaded({"checkpoint_id": "a"}, {"id": "a"}, tmp_path / "x.pt")
    check_loaded({}, {}, tmp_path / "x.pt")  # saved before checkpoints had ids
    with pytest.raises(CheckpointError, match="belongs to checkpoint b, not to the chosen a"):
        check_loaded({"checkpoint_id": "b"}, {"id": "a"}, tmp_path / "x.pt")


# ----------------------------------------------------------------------------- two ranks
def _rank_save_and_resolve(root):
    from pm_dist.distributed import get_rank
    rank = get_rank()
    opened = []
    real = ckpt_mod.sha256_file
    ckpt_mod.sha256_file = lambda p: (opened.append(Path(p).name), real(p))[1]
    try:
        _, first = _save(root, 1)
        hashed_on_save = sorted(opened)
        opened.clear()
        if rank == 1:  # a rank with other ideas: it must not get its own way
            (Path(root) / "step_00000001" / "meta.json").touch()
        ckpt, meta = resolve(root, "auto", log=lambda _: None)
        hashed_on_resolve = sorted(opened)
    finally:
        ckpt_mod.sha256_file = real
    return first, hashed_on_save, str(ckpt), meta["id"], hashed_on_resolve


def test_two_ranks_share_hashing_and_one_decision(dist_pool, tmp_path):
    r0, r1 = dist_pool(2).run(_rank_save_and_resolve, str(tmp_path))
    assert r0[0] == r1[0]  # one id
    # the three files are hashed once in all, spread over the ranks
    assert sorted(r0[1] + r1[1]) == ["head_rank0.pt", "head_rank1.pt",
                                     "mp_rank_00_model_states.pt", "state_rank0.pt",
                                     "state_rank1.pt"]
    assert r0[1] and r1[1]
    assert r0[2:4] == r1[2:4] and r0[3] == r0[0]  # the same checkpoint, chosen by rank 0
    assert len(r0[4]) == 5 and r1[4] == []  # verified once, on rank 0
    assert json.loads((tmp_path / "step_00000001" / "meta.json").read_text())["id"] == r0[0]


def _rank_disagrees(root):
    """Rank 1 reads a meta.json with another id (stale metadata): every rank raises."""
    from pm_dist.distributed import get_rank
    _save(root, 1)
    real = ckpt_mod.read_meta

    def stale(path, verify=True):
        meta = real(path, verify)
        return dict(meta, id="stale") if get_rank() == 1 and not verify else meta

    ckpt_mod.read_meta = stale
    try:
        resolve(root, "auto", log=lambda _: None)
    except CheckpointError as err:
        return str(err)
    finally:
        ckpt_mod.read_meta = real
    return None


def test_a_rank_reading_another_checkpoint_refuses(dist_pool, tmp_path):
    r0, r1 = dist_pool(2).run(_rank_disagrees, str(tmp_path))
    assert r0 == r1 and "resume failed on rank 1: it reads another checkpoint" in r0


# ----------------------------------------------------------------------------- start-up cost
def _as_rank(monkeypatch, module, rank, world):
    monkeypatch.setattr(module, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(module, "get_world_size", lambda group=None: world)


def _write_shards(tmp_path, states):
    meta = {"id": "abc", "world_size": len(states)}
    for r, state in enumerate(states):
        torch.save({"head": state, "checkpoint_id": "abc"}, tmp_path / f"head_rank{r}.pt")
    return meta


def _counting_loads(monkeypatch):
    import pm_dist.training.checkpoints as manager_mod
    opened = []
    real = manager_mod.load_file
    monkeypatch.setattr(manager_mod, "load_file",
                        lambda path: (opened.append(int(Path(path).stem[len("head_rank"):])),
                                      real(path))[1])
    return opened


def test_memory_of_many_shards_opens_only_the_files_a_rank_needs(tmp_path, monkeypatch):
    import pm_dist.heads.memory as mem
    from pm_dist.heads.margin import Margin
    from pm_dist.heads.memory import MemoryConfig, PrototypeMemory
    from pm_dist.training.checkpoints import CheckpointManager

    world, cfg = 16, dict(capacity=64, num_classes=200)
    states = []
    for r in range(world):
        _as_rank(monkeypatch, mem, r, world)
        states.append(PrototypeMemory(8, MemoryConfig(**cfg), Margin()).shard_state())
    meta = _write_shards(tmp_path, states)
    opened = _counting_loads(monkeypatch)
    for r in (0, 5, 15):  # the same world size: each rank opens its own file and no other
        _as_rank(monkeypatch, mem, r, world)
        head = PrototypeMemory(8, MemoryConfig(**cfg), Margin())
        opened.clear()
        head.load_shards(CheckpointManager.head_shards(tmp_path, meta))
        assert opened == [r]
    # another world size: every file once, one at a time (each forgotten before the next)
    _as_rank(monkeypatch, mem, 0, 1)
    head = PrototypeMemory(8, MemoryConfig(**cfg), Margin())
    shards = CheckpointManager.head_shards(tmp_path, meta)
    opened.clear()
    head.load_shards(shards)
    assert opened == list(range(world)) and shards.loaded == []


def test_fc_of_many_shards_opens_only_overlapping_files(tmp_path, monkeypatch):
    import pm_dist.heads.fc as fc
    from pm_dist.heads.fc import FullFC
    from pm_dist.heads.margin import Margin
    from pm_dist.training.checkpoints import CheckpointManager

    world, n = 16, 200
    states = []
    for r in range(world):
        _as_rank(monkeypatch, fc, r, world)
        states.append(FullFC(4, n, Margin(), seed=1).shard_state())
    full = torch.cat([s["head"]["weight"] for s in states])
    meta = _write_shards(tmp_path, states)
    opened = _counting_loads(monkeypatch)
    _as_rank(monkeypatch, fc, 7, world)
    FullFC(4, n, Margin()).load_shards(CheckpointManager.head_shards(tmp_path, meta))
    assert opened == [7]
    _as_rank(monkeypatch, fc, 2, 4)  # rows [100, 150): the shards of 16 that hold them
    head = FullFC(4, n, Margin())
    opened.clear()
    head.load_shards(CheckpointManager.head_shards(tmp_path, meta))
    assert opened == [7, 8, 9, 10, 11]
    assert torch.equal(head.weight.detach(), full[100:150])
