"""Builds never lose an engine: the old one stays whole until the new one has its name, `--out` is only
ever an engine or an empty/new folder, one build writes a folder at a time, and what killed builds left
behind is swept by the next one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import assert_one_line_error, qwen3vl
import export.build_engine as build_module
from export.build_engine import build_engine
from runtime.errors import Qwen3VLError

OLD_CONTEXT, NEW_CONTEXT = 64, 96  # the manifest's max_context tells the old engine from the new one


@pytest.fixture(scope="module")
def built(tiny_checkpoints, tmp_path_factory):
    return build_engine(tiny_checkpoints["gqa2-tied"], tmp_path_factory.mktemp("safety") / "engine",
                        max_context=OLD_CONTEXT)


@pytest.fixture
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["gqa2-tied"]


@pytest.fixture
def engine(built, tmp_path):
    """A fresh copy of a built engine, alone in its parent folder."""
    return Path(shutil.copytree(built, tmp_path / "engines" / "engine"))


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def max_context(engine: Path) -> int:
    return json.loads((engine / "manifest.json").read_text())["max_context"]


def assert_complete(engine: Path) -> None:
    """Every file the manifest lists is there with its recorded hash."""
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["hashes"] and all(hashlib.sha256((engine / name).read_bytes()).hexdigest() == digest
                                      for name, digest in manifest["hashes"].items())


def test_rebuilding_over_an_engine_replaces_it_and_leaves_nothing_beside_it(engine, checkpoint):
    build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert max_context(engine) == NEW_CONTEXT
    assert_complete(engine)
    assert beside(engine) == ["engine"]  # no staging folder, old engine or lock file


def test_staged_files_reach_the_disk_before_the_swap_and_the_swap_after(engine, checkpoint, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def rename(src, dst, *args, **kwargs):
        events.append(("rename", Path(src).name))
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    swap = next(i for i, (kind, name) in enumerate(events) if kind == "rename" and name.startswith(".engine.building."))
    synced_before = {ino for kind, ino in events[:swap] if kind == "fsync"}
    staged = [engine, *engine.iterdir()]  # a rename keeps inode numbers
    assert all(p.stat().st_ino in synced_before for p in staged)
    assert ("fsync", engine.parent.stat().st_ino) in events[swap:]


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()],
                         ids=["os-error", "interrupt"])
def test_a_failure_between_the_two_renames_puts_the_old_engine_back(engine, checkpoint, monkeypatch, failure):
    before, real_rename = contents(engine), os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".engine.building."):  # the new engine taking the name
            raise failure
        real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises((Qwen3VLError, OSError, KeyboardInterrupt)):
        build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert contents(engine) == before
    assert beside(engine) == ["engine"]


def test_an_interrupt_while_removing_the_old_engine_keeps_the_new_one(engine, checkpoint, monkeypatch):
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not Path(path).name.startswith(".engine.building."):  # removing the old engine: cut short
            next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert max_context(engine) == NEW_CONTEXT
    assert_complete(engine)
    assert all(name == "engine" or name.startswith(".engine.old.") for name in beside(engine))


def test_an_interrupt_during_the_build_keeps_the_old_engine_and_leaves_no_staging(engine, checkpoint, monkeypatch):
    before = contents(engine)

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "sha256_file", interrupted)  # late: every graph is written by then
    with pytest.raises(KeyboardInterrupt):
        build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert contents(engine) == before
    assert beside(engine) == ["engine"]


def test_out_holding_the_current_directory_is_refused(engine, checkpoint):
    before = contents(engine)
    result = qwen3vl("build", "--checkpoint", checkpoint, "--out", ".", cwd=engine)
    assert_one_line_error(result, "current directory")
    assert contents(engine) == before


@pytest.mark.parametrize("how", ["parent", "parent-through-symlink", "itself"])
def test_out_holding_the_checkpoint_is_refused(engine, checkpoint, tmp_path, how):
    inner = Path(shutil.copytree(checkpoint, engine / "ck"))
    out = {"parent": engine, "itself": inner, "parent-through-symlink": tmp_path / "link"}[how]
    if how == "parent-through-symlink":
        out.symlink_to(engine, target_is_directory=True)
    before = contents(engine)
    with pytest.raises(Qwen3VLError, match="holds the checkpoint folder"):
        build_engine(inner, out, max_context=NEW_CONTEXT)
    assert contents(engine) == before


def test_an_engine_inside_the_checkpoint_folder_is_built(checkpoint, tmp_path):
    """The rule: `--out` may be inside the checkpoint folder, never the folder itself or one above it."""
    ck = Path(shutil.copytree(checkpoint, tmp_path / "ck"))
    before = contents(ck)
    out = build_engine(ck, ck / "engine", max_context=OLD_CONTEXT)
    assert_complete(out)
    assert {k: v for k, v in contents(ck).items() if not k.startswith("engine/")} == before
    assert sorted(p.name for p in ck.iterdir()) == sorted([*{k.split("/")[0] for k in before}, "engine"])


@pytest.mark.parametrize("manifest", ['{"name": "my-app", "version": 3}', '{"format": "another-engine"}',
                                      "[1, 2]", "not json {", ""], ids=["app", "other-format", "list", "garbage",
                                                                          "empty"])
def test_a_folder_with_someone_elses_manifest_is_refused_and_left_alone(checkpoint, tmp_path, manifest):
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "manifest.json").write_text(manifest)
    (app / "src" / "main.py").write_text("print('keep me')\n")
    before = contents(app)
    with pytest.raises(Qwen3VLError, match="not an engine folder"):
        build_engine(checkpoint, app, max_context=OLD_CONTEXT)
    assert contents(app) == before
    assert beside(app) == ["app"]


def test_a_file_as_out_is_refused(checkpoint, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(Qwen3VLError, match="not an engine folder"):
        build_engine(checkpoint, tmp_path / "notes.txt", max_context=OLD_CONTEXT)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_second_build_to_the_same_folder_fails_at_once(engine, checkpoint):
    from export.engine_folder import EngineReplacement

    before = contents(engine)
    first = EngineReplacement(engine, checkpoint)  # a build in progress: holds the lock, has its staging folder
    try:
        start = time.perf_counter()
        result = qwen3vl("build", "--checkpoint", checkpoint, "--out", engine)
        assert_one_line_error(result, str(engine), "another build")
        assert first.staging.is_dir()  # the running build's staging folder is not swept from under it
        assert time.perf_counter() - start < 120  # refused, not waiting for the first build
    finally:
        first.abort()
    assert contents(engine) == before
    assert beside(engine) == ["engine"]


def test_leftovers_of_killed_builds_are_swept_by_the_next_build(engine, checkpoint):
    for name in (".engine.building.ab12cd_9", ".engine.old.zz9yy8xx"):  # a staging folder, an old engine aside
        (engine.parent / name).mkdir()
        (engine.parent / name / "decoder.onnx.data").write_bytes(b"\0" * (1 << 20))
    (engine.parent / ".engine.lock").touch()  # left by a killed build, unlocked
    others = [".other.building.ab12cd34", ".engine.building.not-ours", "engine.building.ab12cd34"]
    for name in others:  # another target's staging folder, and names a build does not make
        (engine.parent / name).mkdir()
    build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert max_context(engine) == NEW_CONTEXT
    assert beside(engine) == sorted(["engine", *others])


def test_an_engine_left_aside_by_a_killed_swap_is_put_back_by_the_next_build(engine, checkpoint, monkeypatch):
    before = contents(engine)
    engine.rename(engine.parent / ".engine.old.abcd1234")  # killed between the two renames

    def failing(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "sha256_file", failing)  # so the next build fails after its sweep
    with pytest.raises(OSError):
        build_engine(checkpoint, engine, max_context=NEW_CONTEXT)
    assert contents(engine) == before
    assert beside(engine) == ["engine"]
