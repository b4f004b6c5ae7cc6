"""The runner's reporting: sample counts, warnings about the run's conditions, rows printed as shapes finish, the
progress bar's ETA, where results go, and CSV files written by earlier versions; the GPU shape sets, the decode and
kernel modes on the CPU, the option shapes' baseline, the gate's tolerance relative to torch.nn's own error, the time
budget and the GPU check script's syntax."""

import csv
import io
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from . import __main__ as runner
from . import harness, plot, report
from .shapes import SETS, Shape

# The last column of the schema before the warning and CPU columns were appended
_LAST_OLD_COLUMN = "message"


def test_time_fn_takes_enough_samples_for_its_percentiles():
    timing = harness.time_fn(lambda: time.sleep(0.02), min_run_time=0.01)
    assert timing.samples >= harness.MIN_SAMPLES
    assert timing.p20 <= timing.median <= timing.p80


def test_time_in_turns_alternates_blocks_and_times_each_callable():
    """Blocks of the callables alternate (each round starting one further on, so at least one switch a round), each
    gets its samples, and a callable twice as slow reads about twice the time."""
    calls = []

    def sleeper(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    fast, slow = harness.time_in_turns([sleeper("a", 0.002), sleeper("b", 0.004)], min_run_time=0.02)
    assert fast.samples >= harness.MIN_SAMPLES and slow.samples >= harness.MIN_SAMPLES
    assert 1.5 < slow.median / fast.median < 2.5
    switches = sum(a != b for a, b in zip(calls, calls[1:], strict=False))
    assert switches >= harness.MIN_SAMPLES


def test_row_warnings_name_the_load_and_a_slow_gemm():
    clean = dict(loadavg=1.5, threads=2, gemm_gflops=95.0, gemm_end_gflops=100.0, gemm_best_gflops=110.0)
    assert report.row_warnings(clean) == []
    assert report.row_warnings(clean | dict(loadavg=2.5)) == ["load average 2.50 > 2 threads"]
    (slow,) = report.row_warnings(clean | dict(gemm_gflops=30.0))
    assert "GEMM 30 GFLOP/s" in slow and "best 110" in slow
    (moved,) = report.row_warnings(clean | dict(gemm_best_gflops=None, gemm_gflops=40.0))
    assert "best 100" in moved
    assert report.row_warnings(dict(loadavg=9.0, threads=None)) == []


def test_run_warnings_summarise_rows():
    rows = [
        dict(loadavg=load, threads=2.0, dtype="float32", gemm_gflops=30.0, gemm_end_gflops=100.0, gemm_best_gflops=None)
        for load in (1.0, 3.2, 2.4)
    ]
    load, gemm = report.run_warnings(rows)
    assert "2 of 3 rows" in load and "3.20 with 2 threads" in load
    assert gemm.startswith("WARNING: float32, 2 threads: GEMM rate 30 GFLOP/s") and "30%" in gemm


def test_table_aligns_streamed_rows_and_shows_samples():
    table = report.Table(["lstm-H8-B1-T2", "gru-H1024-B64-T100-L2-bi"], ["torch", "seqfast-reference"])
    row = dict(
        shape="lstm-H8-B1-T2",
        dtype="float32",
        threads=2.0,
        mode="fwd",
        provider="torch",
        status="ok",
        message="",
        median_ms=1.5,
        p20_ms=1.4,
        p80_ms=1.7,
        samples=12.0,
        tokens_per_s=1e4,
        gflops=3.0,
        speedup=1.0,
        gemm_frac=0.01,
    )
    header, rule = table.header().splitlines()
    line = table.lines([row])
    assert line.index(" ok") == header.index(" status") == rule.rindex(" ")
    assert line.split()[7] == "12" and header.split()[9] == "n"


def test_progress_shows_an_eta():
    stream = io.StringIO()
    progress = report.Progress(3, every=0.0, stream=stream)
    progress.step("first")
    progress.step("second")
    progress.close()
    first, second = stream.getvalue().splitlines()
    assert first == "[0/3, ETA ?] first"
    assert second.startswith("[1/3, ETA 0:0") and second.endswith("] second")


@pytest.fixture
def fake_runs(monkeypatch, tmp_path, capsys):
    """`python -m benchmarks` on two shapes with the GEMM rate (50 GFLOP/s before the shapes, 100 after) and the
    measurements faked, the thread count left alone, the user folders and the project's results folder under
    `tmp_path`, a load average of 3.5.

    Returns:
        `(run, printed, output)`: `run(*argv)` runs with extra options and gives the exit status; `printed[shape]` is
        what stdout held when that shape's first measurement began; `output` collects all stdout.
    """
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "project")
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 3.0, 2.5))
    monkeypatch.setattr(harness, "set_threads", lambda threads: None)
    rates = iter([50.0, 100.0] * 4)
    monkeypatch.setattr(harness, "gemm_rate", lambda *args: next(rates))
    output, printed = [], {}

    def measure_in_turns(shape, providers, mode, *args):
        output.append(capsys.readouterr().out)
        printed.setdefault(shape.id, "".join(output))
        timing = dict(median_ms=2.0, p20_ms=1.9, p80_ms=2.2, samples=harness.MIN_SAMPLES)
        row = dict(status="ok", message="", gate_err=0.0, gate_tol=1e-4, tokens_per_s=1e5, gflops=10.0) | timing
        return [dict(row) for _ in providers]

    monkeypatch.setattr(harness, "measure_in_turns", measure_in_turns)

    def run(*argv):
        argv = ["--shapes", "gru-H256-B16-T32,lstm-H512-B1-T32", "--providers", "torch", "--threads", "2", *argv]
        status = runner.main([*argv, "--modes", "fwd,infer", "--device", "cpu"])
        output.append(capsys.readouterr().out)
        return status

    return run, printed, output


def test_runner_prints_each_shape_as_it_finishes_and_warns(fake_runs, tmp_path):
    run, printed, output = fake_runs
    assert run() == 0
    assert list(printed) == ["gru-H256-B16-T32", "lstm-H512-B1-T32"]
    assert "gru-H256-B16-T32" not in printed["gru-H256-B16-T32"]
    assert "gru-H256-B16-T32" in printed["lstm-H512-B1-T32"]
    text = "".join(output)
    assert "WARNING: the load average exceeded the thread count in 4 of 4 rows (up to 3.50 with 2 threads)" in text
    assert "WARNING: float32, 2 threads: GEMM rate 50 GFLOP/s (start 50, end 100), 50% of the best known here" in text
    device = harness.device_name("cpu")
    rows = report.read_csv(tmp_path / "data" / "seqfast" / "benchmarks" / f"{device}.csv")
    assert [r["samples"] for r in rows] == [harness.MIN_SAMPLES] * 4
    assert rows[0]["warning"] == "load average 3.50 > 2 threads; GEMM 50 GFLOP/s, 50% of the best 100"
    assert not (tmp_path / "project").exists()
    assert harness.best_gemm_rate(device, 2, "float32") == 100.0


def test_runner_compares_with_the_recorded_gemm_rate(fake_runs, tmp_path):
    run, _, output = fake_runs
    harness.record_gemm_rate(harness.device_name("cpu"), 2, "float32", 400.0)
    run("--no-csv")
    assert "50 GFLOP/s (start 50, end 100), 12% of the best known here (400)" in "".join(output)
    assert "best recorded before in" in "".join(output) and "400.0" in "".join(output)


def test_project_results_only_on_request(fake_runs, tmp_path):
    run, _, _ = fake_runs
    run("--update-project-results")
    run("--out", str(tmp_path / "mine"))
    device = harness.device_name("cpu")
    assert len(report.read_csv(tmp_path / "project" / f"{device}.csv")) == 4
    assert len(report.read_csv(tmp_path / "mine" / f"{device}.csv")) == 4
    assert not (tmp_path / "data").exists()


def test_appending_to_a_file_of_the_previous_schema_extends_its_header(tmp_path):
    old_columns = list(report.COLUMNS)[: list(report.COLUMNS).index(_LAST_OLD_COLUMN) + 1]
    path = tmp_path / "old.csv"
    old_row = dict(timestamp="2026-01-01T00:00:00+00:00", shape="lstm-H8", status="ok", speedup="1.5", threads="2")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns, restval="")
        writer.writeheader()
        writer.writerow(old_row)
    report.append_csv(path, [dict(shape="gru-H8", status="ok", speedup=2.0, warning="load average 3.00 > 2 threads")])
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == list(report.COLUMNS)
    old, new = report.read_csv(path)
    assert (old["shape"], old["speedup"], old["threads"], old["gemm_end_gflops"], old["warning"]) == (
        "lstm-H8",
        1.5,
        2.0,
        None,
        "",
    )
    assert (new["shape"], new["warning"]) == ("gru-H8", "load average 3.00 > 2 threads")
    with pytest.raises(ValueError, match="other columns"):
        report.append_csv(path, [], report.FIRST_CALL_COLUMNS)


def test_committed_results_still_read_and_plot():
    for path in report.RESULTS_DIR.glob("cpu-*.csv"):
        rows = report.read_csv(path)
        assert rows and plot._latest(rows)


def test_plot_reads_the_user_results_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match=str(tmp_path / "seqfast" / "benchmarks")):
        plot.main([])


def test_every_row_names_its_cpu(tmp_path):
    facts = harness.cpu_facts()
    assert set(facts) == {"cpu_vendor", "cpu_model", "cpu_isa", "cpu_l2_kb"} and facts["cpu_isa"] in (
        "avx512",
        "avx2",
        "generic",
    )
    env = harness.environment()
    assert {k: env[k] for k in facts} == facts
    for columns in (report.COLUMNS, report.FIRST_CALL_COLUMNS):
        names = list(columns)
        first = names.index("cpu_vendor")
        assert names[first : first + len(facts)] == list(facts)
    path = tmp_path / "rows.csv"
    report.append_csv(path, [env | dict(shape="lstm-H8", status="ok")])
    (row,) = report.read_csv(path)
    assert (row["cpu_vendor"], row["cpu_model"], row["cpu_isa"]) == (
        facts["cpu_vendor"],
        facts["cpu_model"],
        facts["cpu_isa"],
    )


def test_gpu_sets_and_decoder_shapes():
    assert [s.id for s in SETS["flashrnn"]] == ["lstm-H768-B16-T1024", "gru-H768-B16-T1024"]
    assert len(SETS["gpu-train"]) == 15 and all(s.time >= 100 for s in SETS["gpu-train"])
    assert {s.batch for s in SETS["gpu-infer"]} == {1, 2, 4} and len(SETS["gpu-infer"]) == 15
    assert len(SETS["decode"]) == 6 and len(SETS["decode-small"]) == 3
    decoder = Shape("lstm", 1024, 8, 256, layers=2, module="decoder")
    assert decoder in SETS["decode"] and decoder.id == "lstm-decoder-H1024-B8-T256-L2"
    assert decoder.tokens() == 8 * 256
    assert decoder.decoder_step() == Shape("lstm", 1024, 8, 1, layers=2)
    with pytest.raises(ValueError, match="one direction"):
        Shape("gru", 8, 1, 4, bidirectional=True, module="decoder")


def test_option_shapes_time_the_cell_loop_as_torch():
    """A shape with an option runs `benchmarks.cell_loop` as its `torch` provider (torch.nn has no such option);
    seqfast's reference passes the gate against it in float64 in every mode, within float32's fixed bound, zoneout's
    masks drawn alike; the cpp backend runs every option."""
    assert len(SETS["extensions"]) == 18
    cpp, reference = harness.Provider("seqfast-cpp", "cpp"), harness.Provider("seqfast-reference", "reference")
    for option in ("resets", "layer_norm", "zoneout"):
        shape = Shape("lstm", 8, 3, 6, option=option, bidirectional=True)
        assert shape.id == "lstm-H8-B3-T6-bi-" + option.replace("_", "-")
        for mode in ("infer", "fwdbwd"):
            result = harness.gate(shape, reference, mode)
            assert result.passed and result.error < 1e-4, result.message
        assert harness.unsupported(shape, cpp) is None
    resets = Shape("gru", 8, 3, 6, option="resets", batch_first=True).call_kwargs()["resets"]
    assert resets.shape == (3, 6) and resets.dtype == torch.bool
    with pytest.raises(ValueError, match="packed"):
        Shape("gru", 8, 2, 4, option="resets", packed=True)


def test_option_cost_times_a_call_with_and_without_its_option():
    from .tools.option_cost import option_cost

    cpp = harness.Provider("seqfast-cpp", "cpp")
    plain, option, ratio = option_cost(Shape("gru", 8, 2, 4, option="zoneout"), cpp, rounds=2, calls=1)
    assert plain > 0 and option > 0 and ratio > 0


def test_cpu_autocast_tool_times_both_sides():
    from .tools.cpu_autocast import compare

    for name, steps in (("GRU", 3), ("LSTMCell", 0)):
        theirs, ours = compare(name, (4, 6), 2, steps, grad=True, rounds=2)
        assert theirs > 0 and ours > 0


def test_modes_that_do_not_fit_are_unsupported_not_errors():
    decoder, sequence = Shape("gru", 8, 2, 4, module="decoder"), Shape("gru", 8, 2, 4)
    reference = harness.Provider("seqfast-reference", "reference")
    assert "decoder shape" in harness.unfit(sequence, harness.TORCH, "decode")
    assert "runs in the modes decode" in harness.unfit(decoder, reference, "fwd")
    assert "runs in the modes decode" in harness.unfit(decoder, reference, "kernel")
    assert harness.measure(decoder, harness.TORCH, "infer")["status"] == "UNSUPPORTED"
    with pytest.raises(ValueError, match="decoder shape"):
        harness.setup(sequence, reference, "decode-compile")
    assert harness.gate_problem(decoder, "decode") == (Shape("gru", 8, 2, 1), "infer")
    assert harness.gate_problem(sequence, "kernel") == (sequence, "fwd")


@pytest.fixture
def tiny_set(monkeypatch, tmp_path):
    """A `tiny` shape set (a 2-layer LSTM decoder of H = 8 at B = 2, T = 4 and a GRU of the same size), the GEMM
    rate faked, the user folders under `tmp_path`."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(SETS, "tiny", (Shape("lstm", 8, 2, 4, layers=2, module="decoder"), Shape("gru", 8, 2, 4)))
    monkeypatch.setattr(harness, "gemm_rate", lambda *args: 100.0)
    return tmp_path / "out"


def test_decode_and_kernel_modes_run_through_the_runner(tiny_set, capsys):
    argv = [
        "--set",
        "tiny",
        "--modes",
        "decode,decode-graph,kernel",
        "--providers",
        "torch,seqfast-reference",
        "--threads",
        "1",
    ]
    assert runner.main([*argv, "--device", "cpu", "--min-run-time", "0.01", "--out", str(tiny_set)]) == 0
    printed = capsys.readouterr().out
    rows = {(r["shape"], r["mode"], r["provider"]): r for r in report.read_csv(next(tiny_set.glob("*.csv")))}
    assert len(rows) == 12
    for provider in ("torch", "seqfast-reference"):
        decoded = rows["lstm-decoder-H8-B2-T4-L2", "decode", provider]
        assert decoded["status"] == "ok" and decoded["tokens"] == 8
        assert decoded["step_us"] == pytest.approx(decoded["median_ms"] * 1e3 / 4, rel=1e-4)
        graph = rows["lstm-decoder-H8-B2-T4-L2", "decode-graph", provider]
        assert (graph["status"], graph["message"]) == ("UNSUPPORTED", "CUDA graphs need a CUDA device")
        assert rows["gru-H8-B2-T4", "decode", provider]["status"] == "UNSUPPORTED"
        assert rows["lstm-decoder-H8-B2-T4-L2", "kernel", provider]["status"] == "UNSUPPORTED"
    assert rows["gru-H8-B2-T4", "kernel", "torch"]["message"] == "torch.nn's time loop is not a separate call"
    kernel = rows["gru-H8-B2-T4", "kernel", "seqfast-reference"]
    assert kernel["status"] == "ok" and kernel["step_us"] > 0 and kernel["gate_err"] <= 1e-4
    assert rows["lstm-decoder-H8-B2-T4-L2", "decode", "torch"]["message"].startswith("torch.nn's own error")
    assert all(r["gpu"] == "" and r["fp32_precision"] == "" for r in rows.values())
    assert "µs/step" in printed and "budget spent" not in printed


def test_gate_tolerance_follows_torch_own_error(monkeypatch):
    shape, reference = Shape("gru", 8, 2, 4), harness.Provider("seqfast-reference", "reference")
    monkeypatch.setattr(harness, "_compare", lambda *args: (5e-4, "output", None))
    for own, passed in ((3e-4, True), (1e-4, False)):
        monkeypatch.setattr(harness, "_torch_error", lambda *args, own=own: (own, "h_n", None))
        result = harness.gate(shape, reference, "fwd")
        assert (result.passed, result.tol) == (passed, max(harness.TOLERANCES[torch.float32], 2 * own))
        assert f"torch.nn's own {own:.2e}" in result.message
        own_result = harness.gate(shape, harness.TORCH, "fwd")
        assert own_result.passed and own_result.error == own and "torch.nn's own error" in own_result.message


def test_budget_skips_shapes_and_still_writes_the_csv(fake_runs, tmp_path):
    run, _, output = fake_runs
    assert run("--budget-s", "0", "--out", str(tmp_path / "mine")) == 0
    text = "".join(output)
    assert "budget spent (0 s): skipped gru-H256-B16-T32 float32 2 thr, lstm-H512-B1-T32 float32 2 thr" in text
    (path,) = (tmp_path / "mine").glob("*.csv")
    assert report.read_csv(path) == [] and path.read_text().startswith("timestamp,")


def test_summary_pairs_torch_with_each_provider():
    base = dict(shape="lstm-decoder-H8-B2-T4-L2", mode="decode", dtype="float32", fp32_precision="")
    rows = [
        base | dict(provider="torch", status="ok", median_ms=2.0, step_us=500.0, tokens_per_s=4e3, speedup=1.0),
        base
        | dict(provider="seqfast-triton", status="ok", median_ms=1.0, step_us=250.0, tokens_per_s=8e3, speedup=2.0),
        base | dict(mode="decode-graph", provider="torch", status="UNSUPPORTED"),
    ]
    header, _, decode, graph = report.format_summary(rows).splitlines()
    assert header.split()[4:8] == ["torch", "ms", "seqfast-triton", "ms"]
    assert decode.split()[4:] == ["2", "1", "2.00x", "500", "/", "250", "4k", "/", "8k"]
    assert graph.split()[4:] == ["UNSUPPORTED", "-", "-", "-", "-"]


def test_gpu_check_script_parses():
    script = Path(__file__).resolve().parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0


def test_warm_runs_each_seqfast_case_once_in_worker_processes(capsys):
    argv = ["--device", "cpu", "--set", "small", "--cells", "gru", "--shapes", "H32-B1-T1"]
    assert runner.main([*argv, "--modes", "infer,kernel", "--providers", "torch,seqfast-reference", "--warm", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("warmed 2 cases of set small in ")
    long = Shape("lstm", 8, 2, 500, layers=2, module="decoder")
    assert harness.warm(long, harness.Provider("seqfast-reference", "reference"), "decode", "float32", "cpu") is None
