"""Collection runs: tar shards and @LIST inputs, Parquet output, DDP over shards, kill and resume,
the writer's bounded queue."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clasp_torch.cli import main
from clasp_torch.inputs import member_key
from clasp_torch.io import iter_parquet_labels
from clasp_torch.writers import BackgroundPool, read_logs
from tests.conftest import photo

SEG = ["--backbone", "efficientnet_lite0", "--no-crf", "--device", "cpu", "--quiet"]


def _encoded(seed: int, fmt: str = "JPEG", h: int = 96, w: int = 128) -> bytes:
    buf = io.BytesIO()
    photo(seed, h, w).save(buf, fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _png_labels(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).with_suffix("").as_posix(): np.array(Image.open(p)) for p in out.rglob("*.png")}


def test_member_key_groups_like_webdataset() -> None:
    assert member_key("a/b.c.jpg") == ("a/b", "c.jpg")
    assert member_key("x.jpg") == ("x", "jpg")
    assert member_key("dir.v2/x.json") == ("dir.v2/x", "json")


def test_tar_shard_and_list_inputs_with_bad_members(tmp_path: Path, capsys) -> None:
    shard = _tar(tmp_path / "shards" / "s0.tar", [
        ("k0.jpg", _encoded(0)), ("k0.json", b'{"a": 1}'),           # image + ignored metadata
        ("k1.jpg", b"\xff\xd8 corrupt jpeg"),                        # corrupt member
        ("k2.txt", b"only text"),                                    # no image member
        ("k3.png", _encoded(3, "PNG")),
    ])
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(5).save(photos / "p5.jpg")
    lst = tmp_path / "inputs.txt"
    lst.write_text(f"# a list\n\nphotos/p5.jpg\n{shard}\nphotos/missing.jpg\n")
    out = tmp_path / "out"
    rc = main(["segment", f"@{lst}", "--out", str(out), *SEG, "--num-workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    labels = _png_labels(out)
    assert sorted(labels) == ["photos/p5", "shards/s0/k0", "shards/s0/k3"]
    report = json.loads((out / "clasp_report.json").read_text())
    fails = {Path(f["path"]).name: f["error"] for f in report["failures"]}
    assert set(fails) == {"s0.tar:k1", "s0.tar:k2", "missing.jpg"}
    assert "not an image" in fails["s0.tar:k1"] and "no image member" in fails["s0.tar:k2"]
    assert report["ok"] == 3 and report["inputs"] == 6
    # the shard's image equals the same file segmented directly
    (tmp_path / "direct").mkdir()
    (tmp_path / "direct" / "k0.jpg").write_bytes(_encoded(0))
    assert main(["segment", str(tmp_path / "direct" / "k0.jpg"), "--out", str(tmp_path / "o2"), *SEG,
                 "--no-overlay", "--num-workers", "0"]) == 0
    assert np.array_equal(_png_labels(tmp_path / "o2")["k0"], labels["shards/s0/k0"])


def test_truncated_shard_is_one_failure_and_keeps_earlier_samples(tmp_path: Path) -> None:
    full = _tar(tmp_path / "full.tar", [(f"k{i}.jpg", _encoded(i)) for i in range(3)])
    data = full.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    assert main(["segment", str(cut), "--out", str(out), *SEG, "--no-overlay", "--num-workers", "0"]) == 1
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["ok"] >= 1 and any("truncated tar shard" in f["error"] for f in report["failures"])


def test_parquet_round_trip_equals_the_png_route(tmp_path: Path) -> None:
    _tar(tmp_path / "in" / "s0.tar", [("a.jpg", _encoded(1)), ("b.jpg", _encoded(2, h=64, w=80))])
    for i in range(3):
        photo(10 + i, 72, 100).save(tmp_path / "in" / f"f{i}.png")
    inputs = [str(tmp_path / "in")]
    png, pq = tmp_path / "png", tmp_path / "pq"
    assert main(["segment", *inputs, "--out", str(png), *SEG, "--no-overlay"]) == 0
    assert main(["segment", *inputs, "--out", str(pq), *SEG, "--format", "parquet", "--embeddings"]) == 0
    ref = _png_labels(png)
    assert sorted(p.name for p in pq.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    got = dict(iter_parquet_labels(pq))
    names = {"s0.tar:a": "s0/a", "s0.tar:b": "s0/b", **{f"f{i}.png": f"f{i}" for i in range(3)}}
    assert {Path(k).name for k in got} == set(names)
    for key, lab in got.items():
        assert np.array_equal(lab.numpy(), ref[names[Path(key).name]].astype(np.int64)), key
    import pyarrow.parquet as papq
    from pycocotools import mask as mask_utils

    table = papq.read_table(pq)  # the whole folder reads as one dataset
    assert table.num_rows == 5 and table.column_names[:2] == ["key", "name"]
    row = table.to_pylist()[0]
    seg = row["segments"][0]
    rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode()}
    assert mask_utils.area(rle) == seg["area"] and list(mask_utils.toBbox(rle)) == seg["bbox"]
    assert len(seg["embedding"]) == 80 and all(len(s["embedding"]) == 80 for s in row["segments"])
    assert {s["id"] for s in row["segments"]} == set(range(row["k"]))
    # --resume skips finished parts
    assert main(["segment", *inputs, "--out", str(pq), *SEG, "--format", "parquet", "--resume"]) == 0
    assert json.loads((pq / "_clasp_report.json").read_text())["processed"] == 0


def test_background_pool_queue_is_bounded() -> None:
    pool = BackgroundPool(threads=2, max_pending=3)
    done: list[int] = []
    lock = threading.Lock()

    def slow(i: int) -> None:
        time.sleep(0.005)
        with lock:
            done.append(i)

    for i in range(40):
        pool.submit(slow, i)
        assert pool.pending <= 3
    pool.drain()
    pool.close()
    assert sorted(done) == list(range(40)) and pool.peak_pending == 3
    with pytest.raises(ValueError):
        BackgroundPool(1, 0)


def test_background_pool_drain_reraises_a_task_error_and_keeps_going() -> None:
    pool = BackgroundPool(threads=2, max_pending=4)
    done: list[int] = []

    def task(i: int) -> None:
        if i == 3:
            raise KeyError("boom")
        done.append(i)

    for i in range(10):
        pool.submit(task, i)
    with pytest.raises(KeyError):
        pool.drain()
    pool.drain()  # raised once
    pool.close()
    assert sorted(done) == [i for i in range(10) if i != 3] and pool.pending == 0


def test_writer_queue_bound_holds_in_a_run(tmp_path: Path) -> None:
    from clasp_torch.pipeline import CLASP
    from clasp_torch.segment_run import SegmentConfig, build_segment_run
    from tests.conftest import PatchMeanBackbone

    d = tmp_path / "in"
    d.mkdir()
    for i in range(12):
        photo(i, 64, 64).save(d / f"p{i:02d}.png")
    cfg = SegmentConfig(inputs=[str(d)], out=str(tmp_path / "out"), writer_threads=1, max_pending=2,
                        num_workers=0, progress=False)
    run = build_segment_run(cfg, CLASP(PatchMeanBackbone(), refiner=None, n_init=2))
    peaks: list[int] = []
    original = run.writer.write_on_batch_end

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        original(*args, **kwargs)
        peaks.append(run.writer.pool.peak_pending)

    run.writer.write_on_batch_end = spy  # type: ignore[method-assign]
    run.run()
    assert len(read_logs(tmp_path / "out")) == 12 and max(peaks) <= 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clasp_torch.cli", "segment", *args]


def _wait_for(pred, timeout: float = 240.0) -> None:  # type: ignore[no-untyped-def]
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


def _two_cpus() -> None:  # preexec_fn: at most 2 usable CPUs, so --num-workers auto decodes in threads
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


@pytest.mark.slow
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, "1"), (signal.SIGKILL, "1"), (signal.SIGINT, "auto"),
                                         (signal.SIGKILL, "auto")])
def test_kill_and_resume_gives_exactly_one_complete_output_per_input(tmp_path: Path, sig: int, workers: str) -> None:
    """``workers="1"``: a DataLoader worker process decodes; ``"auto"`` on 2 CPUs: decode threads."""
    d = tmp_path / "in"
    d.mkdir()
    n = 24
    for i in range(n):
        photo(i, 80, 96).save(d / f"p{i:02d}.jpg")
    (d / "bad.jpg").write_bytes(b"not a jpeg")
    ref, out = tmp_path / "ref", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [*SEG, "--num-workers", workers]
    pre = _two_cpus if workers == "auto" else None
    assert subprocess.run(_cli(str(d), "--out", str(ref), *common), env=env, capture_output=True,
                          preexec_fn=pre).returncode == 1
    proc = subprocess.Popen(_cli(str(d), "--out", str(out), *common), env=env, stderr=subprocess.PIPE, preexec_fn=pre)
    _wait_for(lambda: len(list(out.glob("p*.png"))) >= 3)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    done_first = {p.name for p in out.glob("p*.png")}
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    assert 3 <= len(done_first) < n, "the run was not interrupted mid-way"
    for name in done_first:  # every output that exists is complete, overlay included
        assert np.array_equal(np.array(Image.open(out / name)), np.array(Image.open(ref / name)))
        Image.open(out / name.replace(".png", "_overlay.jpg")).load()
    res = subprocess.run(_cli(str(d), "--out", str(out), *common, "--resume"), env=env, capture_output=True,
                         preexec_fn=pre)
    assert res.returncode == 1, res.stderr[-2000:]  # bad.jpg
    report = json.loads((out / "clasp_report.json").read_text())
    assert report["skipped_existing"] == len(done_first) and report["ok"] == n - len(done_first)
    assert sorted(p.name for p in out.glob("p*.png")) == sorted(p.name for p in ref.glob("p*.png"))
    for p in ref.glob("p*.png"):
        assert np.array_equal(np.array(Image.open(out / p.name)), np.array(Image.open(p)))
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_ddp_two_processes_over_two_shards_write_every_key_once(tmp_path: Path) -> None:
    for s in range(2):
        _tar(tmp_path / "in" / f"s{s}.tar", [(f"k{i:02d}.jpg", _encoded(10 * s + i, h=64, w=80)) for i in range(7)])
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(_cli(str(tmp_path / "in"), "--out", str(out), *SEG, "--format", "parquet", "--devices", "2",
                              "--strategy", "ddp", "--batch-size", "2", "--num-workers", "1"),
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    keys = [k for k, _ in iter_parquet_labels(out)]
    expected = [f"{tmp_path / 'in'}/s{s}.tar:k{i:02d}" for s in range(2) for i in range(7)]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    recs = read_logs(out)
    assert len(recs) == 14 and {Path(p).name for p in out.glob(".clasp_log.rank*.jsonl")} == {
        ".clasp_log.rank0.jsonl", ".clasp_log.rank1.jsonl"}
    assert torch.tensor([r["ok"] for r in recs]).all()


def test_label_rles_equal_pycocotools_encode_of_each_mask() -> None:
    from pycocotools import mask as mask_utils

    from clasp_torch.io import _label_rles, label_segments, segment_rows

    rng = np.random.default_rng(0)
    maps = []
    for trial in range(60):
        H, W = (int(v) for v in rng.integers(1, 30, 2))
        lab = rng.integers(-1, int(rng.integers(1, 6)), (H, W))
        if trial % 3 == 0:  # blocky maps too (long runs)
            lab = np.repeat(np.repeat(rng.integers(-1, 4, (3, 3)), 10, 0), 10, 1)[:H, :W]
        if trial % 7 == 0:  # sparse large ids
            lab = lab * 1000
        maps.append(lab)
    maps += [np.full((5, 4), -1), np.full((3, 7), 2), np.zeros((1, 9), np.int64), np.zeros((9, 1), np.int64)]
    big = np.zeros((700, 900), np.int64)  # counts beyond 2**15: four and more 5-bit groups
    big[300:, 450:], big[0, 0], big[699, 899] = 1, 2, 3
    maps.append(big)
    maps.append(rng.integers(-1, 3, (20, 25)) * 40000)  # ids beyond int16: compared as int64
    maps += [rng.integers(0, 4, (12, 13)).astype(np.uint8), rng.integers(-1, 4, (12, 13)).astype(np.int32)]
    for lab in maps:
        H, W = lab.shape
        ids, rles = _label_rles(lab)
        assert ids == sorted(int(v) for v in np.unique(lab) if v >= 0)
        _, counts, areas, boxes = label_segments(lab)
        rows = segment_rows(torch.from_numpy(lab))
        assert [r["id"] for r in rows] == ids
        for j, (sid, rle) in enumerate(zip(ids, rles)):
            ref = mask_utils.encode(np.asfortranarray((lab == sid).astype(np.uint8)))
            assert rle["counts"] == ref["counts"] == counts[j] and list(rle["size"]) == [H, W]
            assert areas[j] == mask_utils.area(ref) == rows[j]["area"]
            assert list(boxes[j]) == list(mask_utils.toBbox(ref)) == rows[j]["bbox"]
            assert rows[j]["rle"] == {"size": [H, W], "counts": ref["counts"].decode()}


def test_ordered_map_keeps_order_bounds_work_in_flight_and_raises() -> None:
    from clasp_torch.sources import ordered_map

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))
        if i == 17:
            raise ValueError("seventeen")
        return i * i

    got = []
    gen = ordered_map(work, range(30), threads=3, ahead=4)
    with pytest.raises(ValueError, match="seventeen"):
        for v in gen:
            with lock:
                assert len(started) <= len(got) + 4  # never more than `ahead` items ahead of the consumer
            got.append(v)
    assert got == [i * i for i in range(17)]


def test_decode_threads_give_the_same_items_as_in_line_decoding(tmp_path: Path) -> None:
    from clasp_torch.inputs import FileInput, ShardInput
    from clasp_torch.sources import FileSource, ShardSource, ThreadedFiles

    members = [("k0.jpg", _encoded(0)), ("k1.jpg", b"\xff\xd8 corrupt"), ("k2.txt", b"x"),
               ("k3.png", _encoded(3, "PNG"))]
    members += [(f"m{i:02d}.jpg", _encoded(10 + i)) for i in range(12)]
    shards = [ShardInput(str(_tar(tmp_path / f"s{s}.tar", members)), f"s{s}") for s in range(2)]
    (tmp_path / "cut.tar").write_bytes(Path(shards[0].path).read_bytes()[:30000])
    shards.append(ShardInput(str(tmp_path / "cut.tar"), "cut"))

    def same(a: list[dict], b: list[dict]) -> None:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                assert (torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]), k

    ref = list(ShardSource(shards))
    assert sum("part_end" in it for it in ref) == 3 and any("error" in it for it in ref)
    for threads in (1, 3):
        same(list(ShardSource(shards, decode_threads=threads, ahead=5)), ref)
    files = [FileInput(str(tmp_path / f"f{i}.jpg"), f"f{i}") for i in range(9)]
    files += [FileInput(str(tmp_path / "no.jpg"), "no")]
    for i in range(9):
        Path(files[i].path).write_bytes(_encoded(i))
    src = FileSource(files)
    order = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]
    same(list(ThreadedFiles(src, order, threads=2, ahead=3)), [src[i] for i in order])
    assert len(ThreadedFiles(src, order, threads=2)) == 10


def test_auto_loading_uses_threads_on_two_cpus_and_processes_above(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    import clasp_torch.segment_run as sr
    from clasp_torch.pipeline import CLASP
    from tests.conftest import PatchMeanBackbone

    for n, expect in ((1, (0, 2)), (2, (0, 2)), (3, (2, 0)), (16, (8, 0))):
        monkeypatch.setattr(sr, "_usable_cpus", lambda n=n: n)
        assert sr.default_loading() == expect
    monkeypatch.setattr(sr, "_usable_cpus", lambda: 2)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        photo(i, 64, 80).save(d / f"p{i}.jpg")
    outs = {}
    model = CLASP(PatchMeanBackbone(), refiner=None, n_init=2)
    for mode, workers in (("threads", "auto"), ("sync", 0), ("proc", 1)):
        cfg = sr.SegmentConfig(inputs=[str(d)], out=str(tmp_path / mode), num_workers=workers, batch_size=2,
                               progress=False)
        run = sr.build_segment_run(cfg, model)
        assert run.data.decode_threads == (2 if mode == "threads" else 0)
        before = sys.getswitchinterval()
        run.run()
        assert sys.getswitchinterval() == before  # the run's shorter GIL switch interval is undone
        outs[mode] = {p.name: p.read_bytes() for p in (tmp_path / mode).glob("p*")}
    assert len(outs["threads"]) == 10 and outs["threads"] == outs["sync"] == outs["proc"]  # PNGs and overlays


def test_decode_image_equals_pillow_on_real_photos_and_exif(tmp_path: Path) -> None:
    from clasp_torch.data import load_image, load_image_bytes
    from clasp_torch.sources import decode_image
    from tests.conftest import DATA_ROOT

    files = sorted((DATA_ROOT / "cocostuff-val-dev" / "images").glob("*.jpg"))[:10]
    im = photo(3, 60, 90)
    exif = im.getexif()
    exif[0x0112] = 6  # rotated: H and W swap
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif)
    for f in [*files, p]:
        data = f.read_bytes()
        assert torch.equal(decode_image(data, f.name), load_image(f)), f
    assert decode_image(p.read_bytes(), "rot.jpg").shape == (3, 90, 60)
    png = _encoded(1, "PNG")
    assert torch.equal(decode_image(png, "x.png"), load_image_bytes(png))
    with pytest.raises(Exception, match="not an image"):
        decode_image(b"\xff\xd8 garbage", "x.jpg")


def test_overlay_fast_path_equals_the_float_blend() -> None:
    from clasp_torch.viz import boundaries, colorize, overlay, overlay_array, overlay_tensor

    rng = np.random.default_rng(1)
    for trial in range(15):
        H, W = (int(v) for v in rng.integers(1, 40, 2))
        img = torch.from_numpy(rng.integers(0, 256, (3, H, W), dtype=np.uint8))
        lab = torch.from_numpy(rng.integers(-1, int(rng.integers(1, 300)), (H, W)))
        ref = 0.5 * img.permute(1, 2, 0).numpy().astype(np.float32) + 0.5 * colorize(lab.numpy()).astype(np.float32)
        ref[boundaries(lab.numpy())] = 255
        ref = ref.clip(0, 255).astype(np.uint8)
        assert np.array_equal(overlay(img, lab), ref)
        assert np.array_equal(overlay_tensor(img, lab).permute(1, 2, 0).numpy(), ref)
        assert np.array_equal(overlay_array(img, lab), ref)


@pytest.mark.parametrize("shape,n,level", [((1, 1), 1, 1), ((37, 53), 5, 1), ((480, 640), 12, 1),
                                           ((300, 17000), 200, 1), ((512, 512), 256, 6)])
def test_label_png_bytes_equal_pillows_palette_png(shape: tuple[int, int], n: int, level: int) -> None:
    """The zlib-written label PNG is Pillow's file byte for byte (noisy maps: several IDAT chunks)."""
    from clasp_torch.viz import label_png_bytes, palette

    rng = np.random.default_rng(n)
    lab = rng.integers(0, n, shape).astype(np.uint8)
    if n == 12:  # blocky, like a real label map
        lab = (np.add.outer(np.arange(shape[0]) // 37, np.arange(shape[1]) // 53) % n).astype(np.uint8)
    im = Image.fromarray(lab, "L")
    im.putpalette(palette(256).reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=level)
    ours = label_png_bytes(lab, compress_level=level)
    assert ours == buf.getvalue()
    back = Image.open(io.BytesIO(ours))
    assert back.mode == "P" and np.array_equal(np.asarray(back), lab)
    with pytest.raises(ValueError):
        label_png_bytes(np.full((2, 2), 256))


def test_overlay_jpeg_decodes_as_close_to_its_pixels_as_pillows() -> None:
    from clasp_torch.viz import encode_overlay_jpeg, overlay_array

    img = torch.from_numpy(np.asarray(photo(3, 120, 160))).permute(2, 0, 1)
    lab = torch.from_numpy(np.add.outer(np.arange(120) // 30, np.arange(160) // 40) % 5)
    ov = overlay_array(img, lab)
    buf = io.BytesIO()
    Image.fromarray(ov).save(buf, format="JPEG", quality=90)
    pillow_err = np.abs(np.asarray(Image.open(buf)).astype(int) - ov).mean()
    for x in (ov, torch.from_numpy(ov).permute(2, 0, 1), Image.fromarray(ov)):
        data = encode_overlay_jpeg(x)
        back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert data[:2] == b"\xff\xd8" and back.shape == ov.shape
        assert np.abs(back - ov).mean() <= 1.1 * pillow_err


def test_raw_jpeg_items_are_decoded_in_predict_step_with_fallback(tmp_path: Path) -> None:
    """The --gpu-decode path (JPEG bytes decoded on the model's device), here on the CPU device."""
    from clasp_torch.data import collate_images, load_image
    from clasp_torch.inputs import FileInput
    from clasp_torch.lightning import CLASPPredictor
    from clasp_torch.pipeline import CLASP
    from clasp_torch.sources import FileSource
    from tests.conftest import PatchMeanBackbone

    for i in range(2):
        (tmp_path / f"g{i}.jpg").write_bytes(_encoded(i))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    photo(7).save(tmp_path / "p.png")
    files = [FileInput(str(tmp_path / n), n) for n in ("g0.jpg", "bad.jpg", "p.png", "g1.jpg")]
    src = FileSource(files, raw_jpeg=True)
    batch = collate_images([src[i] for i in range(4)])
    assert sum(e is not None for e in batch["encoded"]) == 3  # the PNG is decoded on the host
    pred = CLASPPredictor(CLASP(PatchMeanBackbone(), refiner=None, n_init=2))
    recs = pred.predict_step(batch, 0)
    by_name = {r["name"]: r for r in recs}
    assert "error" in by_name["bad.jpg"] and "labels" not in by_name["bad.jpg"]
    for n in ("g0.jpg", "g1.jpg", "p.png"):
        assert torch.equal(by_name[n]["image"], load_image(tmp_path / n))
        assert by_name[n]["labels"].shape == (96, 128)


def test_records_carry_the_image_only_when_the_writer_needs_it(tmp_path: Path) -> None:
    from clasp_torch.data import collate_images
    from clasp_torch.lightning import CLASPPredictor
    from clasp_torch.pipeline import CLASP
    from clasp_torch.segment_run import SegmentConfig, build_segment_run
    from tests.conftest import PatchMeanBackbone

    torch.manual_seed(0)
    model = CLASP(PatchMeanBackbone(), refiner=None, n_init=2)
    batch = collate_images([{"image": torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8), "path": f"p{i}",
                             "index": i} for i in range(2)])
    with_img = CLASPPredictor(model).predict_step(batch, 0)
    without = CLASPPredictor(model, keep_images=False).predict_step(batch, 0)
    assert all("image" in r for r in with_img) and not any("image" in r for r in without)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(with_img, without))
    d = tmp_path / "in"
    d.mkdir()
    photo(0, 64, 64).save(d / "a.png")
    keep = {}
    for fmt, overlays in (("png", True), ("png", False), ("parquet", False)):
        cfg = SegmentConfig(inputs=[str(d)], out=str(tmp_path / f"{fmt}{overlays}"), format=fmt, overlays=overlays,
                            progress=False)
        keep[(fmt, overlays)] = build_segment_run(cfg, model).predictor.keep_images
    assert keep == {("png", True): True, ("png", False): False, ("parquet", False): False}
