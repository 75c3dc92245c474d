"""Group commit of output files (clasp_torch.commit) and its use by the PNG writer."""

from __future__ import annotations

import fnmatch
import os
import threading
from pathlib import Path

import pytest
import torch

import clasp_torch.commit as commit
from clasp_torch.commit import GroupCommitter, publish, stage_bytes, sync_staged
from clasp_torch.segment_run import TMP_PATTERNS
from clasp_torch.writers import SegmentationWriter, read_logs


def test_stage_bytes_writes_a_hidden_temporary_that_resume_removes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    st = stage_bytes(tmp_path / "sub" / "img.png", data)  # the folder is created
    assert Path(st.tmp).read_bytes() == data and not Path(st.final).exists()
    assert Path(st.tmp).parent == tmp_path / "sub" and any(fnmatch.fnmatch(Path(st.tmp).name, p) for p in TMP_PATTERNS)
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(st.tmp).st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
    assert st.dev == os.stat(tmp_path).st_dev
    st2 = stage_bytes(tmp_path / "sub" / "img.png", b"x")
    assert st2.tmp != st.tmp
    publish([st, st2])
    assert Path(st.final).read_bytes() == b"x" and not Path(st.tmp).exists() and not Path(st2.tmp).exists()


def test_stage_bytes_when_another_thread_creates_the_folder_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of two writer threads staging the first files of a new sub-folder: this thread's
    open fails (no folder), then the other thread creates the folder before this one looks
    again. It used to raise (an input of a real run was reported failed); now it retries."""
    real_open, calls = os.open, []

    def racing_open(path: str, *args: object) -> int:
        calls.append(path)
        if len(calls) == 1:
            os.makedirs(os.path.dirname(path))  # the other thread's makedirs lands here
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args)

    monkeypatch.setattr(commit.os, "open", racing_open)
    st = stage_bytes(tmp_path / "new" / "a.png", b"data")
    assert len(calls) == 2 and Path(st.tmp).read_bytes() == b"data"
    monkeypatch.setattr(commit.os, "open", lambda path, *a: (_ for _ in ()).throw(FileNotFoundError(2, "gone", path)))
    with pytest.raises(FileNotFoundError):  # a folder that cannot be made to hold the file: one retry, then the error
        stage_bytes(tmp_path / "new2" / "a.png", b"data")


def test_concurrent_staging_into_new_folders(tmp_path: Path) -> None:
    """Eight threads stage the first files of the same new folders at once: none fails."""
    barrier, errors = threading.Barrier(8), []

    def stage(t: int) -> None:
        barrier.wait()
        for d in range(20):
            try:
                stage_bytes(tmp_path / f"d{d}" / f"{t}.png", b"x")
            except OSError as exc:  # pragma: no cover - the failure this test looks for
                errors.append(exc)

    threads = [threading.Thread(target=stage, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and sum(1 for _ in tmp_path.rglob("*.tmp")) == 8 * 20


def test_stage_bytes_skips_a_leftover_temporary_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools

    monkeypatch.setattr(commit, "_COUNTER", itertools.count(7))
    leftover = tmp_path / f".a.png.{os.getpid()}-7.tmp"
    leftover.write_bytes(b"old")
    st = stage_bytes(tmp_path / "a.png", b"new")
    assert st.tmp.endswith("-8.tmp") and leftover.read_bytes() == b"old"


def test_commit_syncs_once_per_file_system_then_renames_in_order(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    renames: list[str] = []
    monkeypatch.setattr(commit, "_SYNCFS", lambda fd: calls.append(fd) or 0)
    real_replace = os.replace

    def spy_replace(src: str, dst: str) -> None:
        assert not calls or len(calls) == 1  # the sync came first
        renames.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(commit.os, "replace", spy_replace)
    c = GroupCommitter(max_files=5)
    done: list[tuple[str, BaseException | None]] = []
    full = []
    for i in range(3):
        files = [stage_bytes(tmp_path / f"{i}_overlay.jpg", b"j"), stage_bytes(tmp_path / f"{i}.png", b"p")]
        full.append(c.add(files, lambda exc, i=i: done.append((str(i), exc))))
    assert full == [False, False, True] and c.pending_files == 6 and not list(tmp_path.glob("*.png"))
    assert c.commit() == 3
    assert len(calls) == 1 and c.n_commits == 1 and c.pending_files == 0
    assert renames == ["0_overlay.jpg", "0.png", "1_overlay.jpg", "1.png", "2_overlay.jpg", "2.png"]
    assert done == [("0", None), ("1", None), ("2", None)]
    assert c.commit() == 0 and len(calls) == 1  # nothing left: no sync


def test_commit_without_syncfs_fsyncs_each_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(commit, "_SYNCFS", False)  # no syncfs on this platform
    real_fsync = os.fsync
    monkeypatch.setattr(commit.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    files = [stage_bytes(tmp_path / f"{i}.png", b"p") for i in range(4)]
    sync_staged(files)
    assert len(synced) == 4


def test_real_syncfs_commit_writes_the_files(tmp_path: Path) -> None:
    c = GroupCommitter()
    ok: list[BaseException | None] = []
    c.add([stage_bytes(tmp_path / "a.png", b"abc")], ok.append)
    c.commit()
    assert ok == [None] and (tmp_path / "a.png").read_bytes() == b"abc" and os.listdir(tmp_path) == ["a.png"]


def test_a_failed_sync_fails_the_group_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    def failing(fd: int) -> int:
        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(commit, "_SYNCFS", failing)
    c = GroupCommitter()
    errs: list[BaseException | None] = []
    for i in range(2):
        c.add([stage_bytes(tmp_path / f"{i}.png", b"p")], errs.append)
    c.commit()
    assert len(errs) == 2 and all(isinstance(e, OSError) and e.errno == 5 for e in errs)
    assert os.listdir(tmp_path) == []


def test_a_failed_rename_fails_that_input_only(tmp_path: Path) -> None:
    (tmp_path / "1.png").mkdir()  # a folder where input 1's label map should go
    (tmp_path / "1.png" / "x").write_text("keep")
    c = GroupCommitter()
    res: dict[int, BaseException | None] = {}
    for i in range(3):
        files = [stage_bytes(tmp_path / f"{i}.png", b"p"), stage_bytes(tmp_path / f"{i}.json", b"{}")]
        c.add(files, lambda exc, i=i: res.__setitem__(i, exc))
    c.commit()
    assert res[0] is None and res[2] is None and isinstance(res[1], OSError)
    assert sorted(os.listdir(tmp_path)) == ["0.json", "0.png", "1.png", "2.json", "2.png"]  # no temporaries


def test_discard_removes_the_temporaries(tmp_path: Path) -> None:
    c = GroupCommitter()
    called: list[object] = []
    c.add([stage_bytes(tmp_path / "a.png", b"p")], called.append)
    c.discard()
    assert os.listdir(tmp_path) == [] and called == [] and c.commit() == 0
    with pytest.raises(ValueError):
        GroupCommitter(0)


def test_concurrent_adds_and_commits_commit_every_input_once(tmp_path: Path) -> None:
    c = GroupCommitter(max_files=3)
    seen: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(25):
            k = 100 * t + i
            def done(exc: BaseException | None, k: int = k) -> None:
                with lock:
                    seen.append(k)

            if c.add([stage_bytes(tmp_path / f"{k}.png", b"p")], done):
                c.commit()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    c.commit()
    assert sorted(seen) == sorted(100 * t + i for t in range(4) for i in range(25))
    assert len(os.listdir(tmp_path)) == 100 and c.n_committed == 100 and c.n_commits < 100


def _records(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"path": f"/in/{i}.jpg", "name": f"img{i}", "index": i, "k": 3, "k_opt": 3,
             "image": torch.randint(0, 256, (3, 24, 32), dtype=torch.uint8, generator=g),
             "labels": torch.randint(0, 3, (24, 32), generator=g)} for i in range(n)]


class _Trainer:
    global_rank = 0


@pytest.mark.parametrize("threads", [0, 2])
def test_writer_logs_an_input_only_once_its_files_are_renamed(tmp_path: Path, threads: int) -> None:
    """Every logged input has its overlay and label map in place at the moment it is logged, and
    the synchronous writer commits each input at once."""
    w = SegmentationWriter(tmp_path, threads=threads, commit_files=8)
    w.on_predict_start(_Trainer(), None)  # type: ignore[arg-type]
    real_log = w._log
    missing: list[str] = []

    def checking_log(entry: dict) -> None:
        for suffix in (".png", "_overlay.jpg"):
            if not (tmp_path / (entry["name"] + suffix)).exists():
                missing.append(entry["name"] + suffix)
        real_log(entry)

    w._log = checking_log  # type: ignore[method-assign]
    recs = _records(20)
    for b in range(0, 20, 5):
        w.write_on_batch_end(None, None, recs[b:b + 5], None, {}, b, 0)  # type: ignore[arg-type]
    w.finish(complete=True)
    logs = read_logs(tmp_path)
    assert missing == [] and sorted(r["index"] for r in logs) == list(range(20)) and all(r["ok"] for r in logs)
    assert w.committer.n_committed == 20 and not list(tmp_path.glob(".*.tmp"))
    if threads == 0:
        assert w.committer.n_commits == 20


def test_writer_thread_defaults_follow_the_format(tmp_path: Path) -> None:
    """``png`` encoders release the GIL (one thread per CPU, 2-8); the Parquet row encoder holds it
    (one thread)."""
    from clasp_torch.writers import default_writer_threads

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert default_writer_threads("png") == max(2, min(8, n)) and default_writer_threads("parquet") == 1
    assert SegmentationWriter(tmp_path, format="parquet").threads == 1
    assert SegmentationWriter(tmp_path, format="parquet", threads=3).threads == 3
    assert SegmentationWriter(tmp_path).threads == default_writer_threads("png")
