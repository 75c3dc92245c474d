"""Smoke tests of the benchmark scripts: they run on tiny inputs and write their outputs.

No wall-clock assertions: only that each script runs end to end on the CPU and produces its
CSV / JSON / markdown / PNG / Chrome-trace files with the expected structure.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_run_quick_writes_tables(tmp_path) -> None:
    from benchmarks.run import STAGES, main

    csv_p, json_p, md_p = tmp_path / "run.csv", tmp_path / "run.json", tmp_path / "run.md"
    out = main(["--quick", "--device", "cpu", "--threads", "1", "--size", "96", "64", "--csv", str(csv_p),
                "--json", str(json_p), "--markdown-file", str(md_p)])
    rows = list(csv.DictReader(csv_p.open()))
    assert [int(r["batch_size"]) for r in rows] == [1, 2]
    for r in rows:
        for s in STAGES:
            assert float(r[f"{s}_ms"]) >= 0
        assert float(r["images_per_s_crf"]) > 0 and float(r["images_per_s_nocrf"]) > 0
        assert float(r["ratio_spectral_cluster"]) > 0 and float(r["ratio_whole_crf"]) > 0
        assert float(r["ratio_spectral_cluster_gram"]) > 0 and float(r["ratio_whole_crf_gram"]) > 0
        assert r["k_consistent"] == "1"  # the stage decomposition reproduces forward's K
    payload = json.loads(json_p.read_text())
    assert payload["reference"]["n"] == 2 and payload["meta"]["machine"]["cpu"]
    md = md_p.read_text()
    assert "Machine:" in md and "| batch |" in md and "literal / ours" in md and "Gram path / ours" in md
    for res in payload["results"]:  # the references ran on the images ours was timed on
        assert res["extras"]["reference"]["n"] == res["extras"]["ours_on_reference_images"]["n"] == res["n_images"]
    assert out["results"][0]["stage_ms_per_image"]["kmeans"] >= 0


def test_run_stage_problems_match_select_k() -> None:
    """``problems_of`` + ``kmeans_of`` + ``silhouette_of`` are ``select_k``'s calls (same labels, scores)."""
    from benchmarks.run import kmeans_of, problems_of, silhouette_of
    from clasp_torch.cluster import select_k

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    lo, hi = torch.tensor([2, 3]), torch.tensor([4, 5])
    prob = problems_of(emb, mask, lo, hi)
    assert prob is not None and prob["k"].tolist() == [2, 3, 4, 3, 4, 5]
    res = kmeans_of(prob)
    sc = silhouette_of(prob, res.labels)
    sel = select_k(emb, mask, lo, hi)
    assert torch.equal(sc, sel.scores[prob["b_idx"], prob["kc_idx"]])
    for b in range(2):
        p = int(((prob["b_idx"] == b) & (prob["k"] == sel.k[b])).nonzero()[0, 0])
        assert torch.equal(res.labels[p], sel.labels[b])


def test_scaling_quick_writes_csv_and_plots(tmp_path) -> None:
    from benchmarks.scaling import main

    out = main(["--quick", "--device", "cpu", "--threads", "1", "--n", "60", "120", "--megapixels", "0.003", "0.006",
                "--full-max", "60", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "scaling_spectral.csv").open()))
    assert {(r["method"], int(r["n"])) for r in rows} == {("gram", 60), ("gram", 120), ("full", 60)}
    assert any("skipped" in n for n in out["notes"])  # full path above --full-max
    crf_rows = list(csv.DictReader((tmp_path / "scaling_crf.csv").open()))
    assert len(crf_rows) == 2 and all(float(r["torch_s"]) > 0 for r in crf_rows)
    for png in ("scaling_spectral.png", "scaling_crf.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gram_eigen" in out["slopes"] and "crf_torch" in out["slopes"]


def test_profile_cpu_writes_trace(tmp_path) -> None:
    from benchmarks.profile_gpu import main

    out = main(["--device", "cpu", "--batch-size", "1", "--size", "64", "48", "--amp", "bf16", "--repeats", "1",
                "--threads", "1", "--out-dir", str(tmp_path)])
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    for stage in ("backbone", "affinity+eigen", "kmeans", "silhouette", "crf"):
        assert f"clasp/{stage}" in names
    assert set(out["backbone_ms_per_batch"]) == {"eager fp32", "eager bf16"}
    assert (tmp_path / "profile_summary.json").exists() and (tmp_path / "profile_ops.txt").exists()


def test_tensor_peak_is_the_high_water_mark_of_live_tensor_bytes() -> None:
    from benchmarks.run import TensorPeak

    a = torch.empty(1000, 1000)  # 4,000,000 B allocated before the block: not counted
    with TensorPeak("cpu") as tp:
        b = torch.empty(2000, 2000)  # 16,000,000 B, freed below
        del b
        c = torch.empty(500, 1000, dtype=torch.float64)  # 4,000,000 B
        d = torch.empty(3000, 3000, dtype=torch.uint8)  # 9,000,000 B while c lives: 13,000,000
        del a, c, d  # frees of the block (a's included) never raise the mark
    assert 16_000_000 <= tp.peak_bytes < 16_000_000 + 4096
    with TensorPeak("cpu") as tp2:
        e = torch.empty(2000, 2000)
        f = torch.empty(1000, 1000)  # 20,000,000 B live together
        del e, f
    assert 20_000_000 <= tp2.peak_bytes < 20_000_000 + 4096


def test_memory_script_writes_rows_per_batch_size(tmp_path) -> None:
    from benchmarks.memory import main

    json_p, md_p = tmp_path / "mem.json", tmp_path / "mem.md"
    out = main(["--device", "cpu", "--threads", "1", "--backbone", "efficientnet_lite0", "--batch-sizes", "1", "2",
                "--size", "96", "64", "--n-init", "2", "--crf-labels", "2", "8", "--json", str(json_p),
                "--markdown-file", str(md_p)])
    rows = json.loads(json_p.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2] == [r["batch_size"] for r in out["rows"]]
    for r in rows:
        # every stage allocates; the whole forward holds at least what its largest stage needs
        # beyond the backbone features, and the CRF pass is part of the forward with CRF
        assert min(r["backbone_mib"], r["cluster_features_mib"], r["crf_mib"]) > 0
        assert r["forward_crf_mib"] >= r["crf_mib"] and r["forward_nocrf_mib"] >= r["backbone_mib"]
    assert rows[1]["crf_mib"] > rows[0]["crf_mib"]  # two images hold more than one
    assert "| batch |" in md_p.read_text()
    sweep = out["crf_mib_per_image_by_labels"]
    assert 0 < sweep[2] < sweep[8]  # the CRF's label buffers grow with the number of labels
    gpu = main(["--device", "cpu", "--threads", "1", "--backbone", "efficientnet_lite0", "--batch-sizes", "2",
                "--size", "96", "64", "--n-init", "2", "--gpu-policy"])
    assert gpu["meta"]["gpu_policy"] and gpu["rows"][0]["forward_crf_mib"] > 0


def test_op_counter_counts_kernels_and_host_syncs() -> None:
    from benchmarks.launches import count_ops

    x = torch.arange(12.0).view(3, 4)
    with count_ops() as c:
        y = x.t()  # a view: no kernel
        z = x + 1  # 1 kernel
        z.mul_(2)  # 1 kernel
        _ = x[x > 3]  # gt + boolean index (a sync on CUDA)
        _ = int(z.sum())  # sum + scalar read (a sync)
        _ = y.tolist()  # a device-to-host copy (a sync)
        _ = torch.repeat_interleave(torch.tensor([1, 2]), 2, output_size=4)  # known size: no sync
    assert c.kernels == 6, c.by_op  # add, mul_, gt, index, sum, repeat_interleave
    assert c.syncs == 3, c.sync_by_op
    assert c.sync_by_op == {"index": 1, "_local_scalar_dense": 1, "tolist": 1}


def test_launches_script_counts_every_stage(tmp_path) -> None:
    from benchmarks.launches import main

    json_p = tmp_path / "launches.json"
    out = main(["--backbone", "efficientnet_lite0", "--batch-sizes", "1", "2", "--size", "96", "64", "--threads", "1",
                "--json", str(json_p)])
    rows = out["rows"]
    assert set(rows) == {"1", "2"} and json.loads(json_p.read_text())["host_us_per_op"] > 0
    for r in rows.values():
        assert {"backbone", "cluster_features", "kmeans", "silhouette", "crf"} <= set(r)
        assert all(v["kernels"] > 0 for v in r.values())


def test_harness_names_stay_importable_from_run() -> None:
    import benchmarks.harness as harness
    import benchmarks.run as run

    for name in harness.__all__:
        assert getattr(run, name) is getattr(harness, name), name


def test_pinned_cluster_policy_reaches_the_clustering_stage() -> None:
    """The stages ask ``clasp_torch.cluster.policy.cluster_policy``; pinning must answer there
    (and for the package's name), and be undone afterwards."""
    from benchmarks.harness import pinned_cluster_policy
    from clasp_torch import cluster
    from clasp_torch.cluster import policy as policy_module

    cpu = torch.device("cpu")
    own = policy_module.cluster_policy(cpu)
    gpu = policy_module.cluster_policy(torch.device("cuda"))  # no CUDA needed to ask
    assert own != gpu
    with pinned_cluster_policy(gpu):
        assert policy_module.cluster_policy(cpu) is gpu and cluster.cluster_policy(cpu) is gpu
    assert policy_module.cluster_policy(cpu) == own and cluster.cluster_policy(cpu) == own


def test_io_benchmark_reports_every_format_and_the_bound(tmp_path) -> None:
    """``python -m benchmarks.io`` end to end on a few photos: the JSON keys of issue #12, one
    bound per round from the parts measured at its start and end, and the real writer's files."""
    from benchmarks.io import FILES_PER_IMAGE, main

    FORMATS = ("png_no_overlay", "png")

    out = tmp_path / "io.json"
    assert main(["--images", "12", "--repeats", "1", "--batch-size", "4", "--settings", "disk",
                 "--formats", "png_no_overlay,png", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("before", "after", "bound"):
        assert set(res[key]) == set(FORMATS) and all(v > 0 for v in res[key].values())
    rnd = res["rounds"][0]
    for part, ms in rnd["parts_ms"].items():
        assert ms == pytest.approx((rnd["parts_ms_start"][part] + rnd["parts_ms_end"][part]) / 2)
    assert res["after_over_bound_rounds"]["png"] == [pytest.approx(res["after"]["png"] / res["bound"]["png"])]
    assert res["after_over_bound"]["png"] == pytest.approx(res["after_over_bound_of_medians"]["png"])  # one round
    # the bound with the output files: each format's ms per image plus its files' writing
    parts = rnd["parts_ms"]
    for fmt in FORMATS:
        for files, key in (("file_write", "bound_with_files"), ("file_write_disk", "bound_with_files_disk")):
            want = 1000 * res["host"]["usable_cores"] / rnd[key][fmt]
            got = 1000 * res["host"]["usable_cores"] / rnd["bound"][fmt] + FILES_PER_IMAGE[fmt] * parts[files]
            assert want == pytest.approx(got), (fmt, key)
        assert rnd["disk"][fmt]["images_per_s"] > 0
        assert res["after_disk_over_bound_with_files"][fmt] == pytest.approx(
            rnd["disk"][fmt]["images_per_s"] / rnd["bound_with_files_disk"][fmt])
    assert parts["file_write"] > 0 and parts["file_write_disk"] > 0


def test_io_benchmark_out_root_falls_back_to_disk_when_shm_is_small(monkeypatch) -> None:
    """``--out-root memory`` uses /dev/shm only with room for the runs' outputs (a container's
    64 MiB /dev/shm would fill and fail inputs): else the temp folder (None)."""
    import shutil
    from collections import namedtuple

    from benchmarks import io as bio

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(bio.os.path, "isdir", lambda p: True)
    monkeypatch.setattr(bio.os, "access", lambda p, mode: True)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 26, 0, 1 << 26))
    assert bio.out_root("memory") is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 34, 0, 1 << 33))
    assert bio.out_root("memory") == "/dev/shm"
    assert bio.out_root("disk") is None and bio.out_root("/some/folder") == "/some/folder"
