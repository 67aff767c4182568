"""The benchmark harness and suite: timing, memory counting, work models, writers, providers, the CLI."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import time

import pytest
import torch
from tolerances import assert_close
from torch import nn

from lorafast import benchmark, benchmark_suite, cli, reference
from lorafast.benchmark import (
    BenchRow,
    Step,
    TimingBudget,
    atomic_output,
    check_output_path,
    compare_times,
    fill_relative_metrics,
    format_table,
    measure_graph_time,
    measure_host_time,
    measure_time,
    saved_activation_bytes,
    write_csv,
    write_json,
)
from lorafast.benchmark_suite import (
    BaseLayerProvider,
    CompiledNaiveProvider,
    LayerCase,
    LorafastProvider,
    NaiveProvider,
    PeftProvider,
    Plan,
    Runner,
    Sweep,
    TrainStepCase,
    bytes_moved,
    flop_count,
    make_layer_inputs,
    make_layer_weights,
    missing_package,
    prepare_step,
)

CPU = torch.device("cpu")
TINY_BUDGET = TimingBudget(cpu_seconds=0.01, cpu_warmup_calls=1, cpu_min_calls=3, cpu_max_calls=5)
ENVIRONMENT_FIELDS = (
    "device",
    "torch_version",
    "triton_version",
    "peft_version",
    "transformers_version",
    "lorafast_version",
    "git_commit",
)


def _row(provider: str, median_ms: float | None, mode: str = "forward", status: str = "ok") -> BenchRow:
    timing = {} if median_ms is None else dict(median_ms=median_ms, p20_ms=median_ms * 0.9, p80_ms=median_ms * 1.1)
    return BenchRow(
        suite="layer", case="8->8", mode=mode, provider=provider, dtype="float32", tokens=4, rank=2, dropout=0.0,
        status=status, **timing,
    )  # fmt: skip


# --------------------------------------------------------------------------- timing and memory


def test_measure_time_cpu_percentiles_calls_and_grad_reset():
    tensor = torch.zeros(2, requires_grad=True)
    calls = []

    def sleep_two_ms() -> None:
        assert tensor.grad is None, "the harness must clear .grad before every call"
        tensor.grad = torch.ones(2)
        calls.append(1)
        time.sleep(0.002)

    budget = TimingBudget(cpu_seconds=0.02, cpu_warmup_calls=2, cpu_min_calls=3, cpu_max_calls=6)
    timing = measure_time(sleep_two_ms, CPU, budget, grads_to_reset=[tensor])
    assert 2 + 3 <= len(calls) <= 2 + 6
    assert 2.0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_compare_times_interleaves_steps_each_in_its_context():
    calls, contexts = [], []

    @contextlib.contextmanager
    def tagged(tag: str):
        contexts.append(tag)
        yield

    steps = {
        name: Step(run=functools.partial(calls.append, name), context=functools.partial(tagged, name))
        for name in ("a", "b")
    }
    budget = TimingBudget(cpu_seconds=0.001, cpu_warmup_calls=1, cpu_min_calls=3, cpu_max_calls=4)
    timings = compare_times(steps, CPU, budget)
    assert set(timings) == {"a", "b"}
    assert calls[:6] == ["a", "b"] * 3 and len(calls) in (2 * 4, 2 * 5)  # one warmup round, then 3 or 4
    assert contexts == calls  # every call ran inside its own step's context


@pytest.mark.parametrize(
    "budget_kwargs",
    [dict(cpu_seconds=0.0), dict(cpu_min_calls=2), dict(cpu_min_calls=8, cpu_max_calls=4), dict(cuda_rep_ms=0)],
)
def test_timing_budget_rejects_bad_values(budget_kwargs):
    with pytest.raises(ValueError, match="timing budgets|cpu_min_calls"):
        TimingBudget(**budget_kwargs)


def test_measure_time_rejects_other_devices():
    with pytest.raises(ValueError, match="'meta'"):
        measure_time(lambda: None, torch.device("meta"), TINY_BUDGET)


def test_measure_host_time_times_back_to_back_calls_between_synchronizes(monkeypatch):
    """CUDA's order of events without a GPU: warmup, then per sample sync, `calls` calls, sync."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))

    def sleep_one_ms() -> None:
        events.append("call")
        time.sleep(0.001)

    timing = measure_host_time(sleep_one_ms, torch.device("cuda"), calls=4, samples=3, warmup_calls=1)
    assert events == ["call"] + (["sync"] + ["call"] * 4 + ["sync"]) * 3
    assert 1.0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms < 50


def test_measure_host_time_on_cpu_and_bad_arguments():
    calls = []
    timing = measure_host_time(functools.partial(calls.append, 1), CPU, calls=2, samples=3, warmup_calls=0)
    assert len(calls) == 6 and 0 <= timing.median_ms < 10
    with pytest.raises(ValueError, match="samples >= 3"):
        measure_host_time(lambda: None, CPU, samples=2)
    with pytest.raises(ValueError, match="'meta'"):
        measure_host_time(lambda: None, torch.device("meta"))


def test_measure_graph_time_warms_up_on_a_side_stream_captures_once_and_times_replay(monkeypatch):
    """The CUDA-graph recipe without a GPU: torch.cuda's stream and graph objects replaced by fakes."""
    events = []

    class FakeStream:
        def wait_stream(self, other):
            events.append(f"{self.name} waits")

    side, main = FakeStream(), FakeStream()
    side.name, main.name = "side", "main"
    current = [main]

    @contextlib.contextmanager
    def use_stream(stream):
        current.append(stream)
        yield
        current.pop()

    class FakeGraph:
        def replay(self):
            events.append("replay")

        def reset(self):
            events.append("reset")

    @contextlib.contextmanager
    def capture(graph):
        events.append("capture")
        yield
        events.append("captured")

    def fake_measure_time(fn, device, budget):
        fn()
        return benchmark.Timing(1.0, 0.9, 1.1)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(benchmark, "measure_time", fake_measure_time)
    timing = measure_graph_time(lambda: events.append(f"call on {current[-1].name}"), torch.device("cuda"), TINY_BUDGET)
    assert timing == benchmark.Timing(1.0, 0.9, 1.1)
    assert events == [
        "side waits", *["call on side"] * 3, "main waits", "capture", "call on main", "captured", "replay", "reset",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        measure_graph_time(lambda: None, CPU, TINY_BUDGET)


def test_saved_activation_bytes_counts_each_storage_once_and_skips_parameters():
    activation = torch.randn(4, 8, requires_grad=True)  # 128 bytes
    parameter = nn.Parameter(torch.randn(4, 8))

    def forward() -> torch.Tensor:
        # mul saves both operands: two views of `activation`, then `activation` and `parameter`
        return (activation[:2] * activation[2:]).sum() + (activation * parameter).sum()

    assert saved_activation_bytes(forward, [parameter]) == 4 * 8 * 4
    assert saved_activation_bytes(forward, []) == 2 * 4 * 8 * 4


def test_lorafast_saves_x_and_u_only_and_less_than_peft():
    """DESIGN.md §3 through the harness: lorafast keeps x and u [M, r] fp32 (the seed as an int); PEFT more."""
    case = LayerCase(64, 48, 32, 4, dropout=0.1)
    weights, inputs = make_layer_weights(case, CPU, torch.float32), make_layer_inputs(case, CPU, torch.float32)

    def saved(provider) -> int:
        module = provider.build(weights).train()
        return saved_activation_bytes(lambda: module(inputs.x), module.parameters())

    lorafast_bytes = saved(LorafastProvider("torch"))
    assert lorafast_bytes == case.tokens * case.in_features * 4 + case.tokens * case.rank * 4
    assert saved(PeftProvider()) > lorafast_bytes
    assert saved(BaseLayerProvider()) == 0  # W is frozen: nn.Linear needs only W for dX


# --------------------------------------------------------------------------- work models


def test_flop_count_by_hand():
    case = LayerCase(in_features=4, out_features=2, tokens=3, rank=1, dropout=0.0)
    base = 2 * 3 * 4 * 2  # x Wᵀ (forward) or dY W (backward): 48
    lora_forward = 2 * 3 * 1 * 4 + 2 * 3 * 1 * 2  # x Aᵀ, u Bᵀ: 36
    lora_backward = 2 * lora_forward  # du, dB, dA, du A: 72
    assert flop_count(case, "forward") == base + lora_forward
    assert flop_count(case, "backward") == base + lora_backward
    assert flop_count(case, "forward+backward") == 2 * base + lora_forward + lora_backward
    assert flop_count(case, "decode") == flop_count(case, "inference-unmerged") == base + lora_forward
    assert flop_count(case, "forward", with_lora=False) == base


def test_bytes_moved_by_hand():
    case = LayerCase(in_features=4, out_features=2, tokens=3, rank=1, dropout=0.0)
    x, w, y, factors, u = 12 * 2, 8 * 2, 6 * 2, (4 + 2) * 4, 3 * 4  # bf16 activations, fp32 LoRA
    assert bytes_moved(case, "inference-unmerged", 2) == x + w + y + factors
    assert bytes_moved(case, "forward", 2) == x + w + y + factors + u
    # backward reads dY, W, x, u, A, B and writes dX, dA, dB
    assert bytes_moved(case, "backward", 2) == y + w + x + x + u + 2 * factors
    assert bytes_moved(case, "inference-merged", 2, with_lora=False) == x + w + y


# --------------------------------------------------------------------------- providers


def _reference_output_and_grads(weights, inputs):
    """fp64 autograd through the plain formula: (y, dX, dA, dB)."""
    x = inputs.x.detach().double().requires_grad_(True)
    lora_A = weights.lora_A.double().requires_grad_(True)
    lora_B = weights.lora_B.double().requires_grad_(True)
    y = reference.naive_lora_linear(x, weights.weight.double(), None, lora_A, lora_B, weights.scaling, 0.0)
    y.backward(inputs.grad_y.double())
    return y, x.grad, lora_A.grad, lora_B.grad


@pytest.mark.parametrize("provider", [NaiveProvider(), PeftProvider(), LorafastProvider("torch")], ids=lambda p: p.name)
def test_training_providers_compute_the_same_function(provider):
    case = LayerCase(48, 40, 24, 4, dropout=0.0)
    weights, inputs = make_layer_weights(case, CPU, torch.float32), make_layer_inputs(case, CPU, torch.float32)
    expected_y, expected_dx, expected_dA, expected_dB = _reference_output_and_grads(weights, inputs)
    module = provider.build(weights).train()
    y = module(inputs.x)
    y.backward(inputs.grad_y)
    grad_A, grad_B = (p.grad for p in module.parameters() if p.requires_grad)
    for actual, expected in [
        (y, expected_y),
        (inputs.x.grad, expected_dx),
        (grad_A, expected_dA),
        (grad_B, expected_dB),
    ]:
        assert_close(actual, expected, torch.float32)


INFERENCE_CASES = [
    (provider, mode)
    for provider in [CompiledNaiveProvider(), PeftProvider(), LorafastProvider("torch")]
    for mode in ["inference-unmerged", "inference-merged"]
    if provider.supports(mode)
]


@pytest.mark.parametrize(("provider", "mode"), INFERENCE_CASES, ids=[f"{p.name}-{m}" for p, m in INFERENCE_CASES])
def test_inference_providers_compute_the_same_function(provider, mode):
    case = LayerCase(48, 40, 24, 4, dropout=0.1)  # eval: dropout off
    weights, inputs = make_layer_weights(case, CPU, torch.float32), make_layer_inputs(case, CPU, torch.float32)
    expected = _reference_output_and_grads(weights, inputs)[0]
    with provider.activated():
        step = prepare_step(provider, provider.build(weights), mode, inputs)
        assert_close(step.run(), expected, torch.float32)


def test_lorafast_triton_is_unavailable_on_cpu_with_a_reason():
    assert LorafastProvider("triton").unavailable_reason(CPU) == "the Triton backend needs CUDA"
    assert missing_package("no_such_package_for_lorafast").startswith("no_such_package_for_lorafast is not installed")
    assert missing_package("torch") is None


def test_prepare_step_rejects_unknown_mode():
    case = LayerCase(8, 8, 4, 2, 0.0)
    with pytest.raises(ValueError, match="unknown benchmark mode 'sideways'"):
        prepare_step(
            NaiveProvider(), NaiveProvider().build(make_layer_weights(case, CPU, torch.float32)), "sideways", None
        )


@pytest.mark.parametrize("field_values", [dict(tokens=0), dict(rank=-1), dict(dropout=1.0)])
def test_layer_case_rejects_bad_sizes(field_values):
    with pytest.raises(ValueError, match="LayerCase"):
        LayerCase(**{**dict(in_features=8, out_features=8, tokens=4, rank=2, dropout=0.0), **field_values})


class _BrokenProvider(NaiveProvider):
    name = "broken"

    def build(self, weights):
        raise RuntimeError("kernel exploded\nsecond line")


def test_runner_reports_failures_as_rows(monkeypatch):
    """A torch.compile failure is a skip with the reason; any other provider's failure is an error row."""

    class NoCompiler(nn.Module):
        def forward(self, x):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(benchmark_suite.torch, "compile", lambda module: NoCompiler())
    runner = Runner(CPU, torch.float32, TINY_BUDGET, [BaseLayerProvider(), CompiledNaiveProvider(), _BrokenProvider()])
    rows = runner.run_layer_case(LayerCase(16, 8, 4, 2, 0.0), ("forward", "decode"))
    status = {(row.provider, row.mode): row.status for row in rows}
    assert status[("base", "forward")] == status[("base", "decode")] == "ok"
    assert status[("naive+compile", "forward")] == "skipped: torch.compile failed (RuntimeError: no C++ compiler)"
    assert status[("naive+compile", "decode")] == status[("naive+compile", "forward")]
    assert status[("broken", "forward")] == "error: RuntimeError: kernel exploded"
    assert [row.mode for row in rows] == ["forward"] * 3 + ["decode"] * 3


# --------------------------------------------------------------------------- reporting


def test_fill_relative_metrics():
    rows = [
        _row("base", 2.0),
        _row("peft", 4.0),
        _row("lorafast[torch]", 2.5),
        _row("lorafast[triton]", None, status="skipped: x"),
    ]
    rows += [_row("base", 1.0, mode="decode"), _row("naive", 3.0, mode="decode")]
    fill_relative_metrics(rows)
    by_key = {(row.mode, row.provider): row for row in rows}
    assert by_key[("forward", "lorafast[torch]")].ratio_to_floor == pytest.approx(1.25)
    assert by_key[("forward", "lorafast[torch]")].speedup_over_peft == pytest.approx(1.6)
    assert by_key[("forward", "peft")].speedup_over_peft == pytest.approx(1.0)
    assert by_key[("forward", "lorafast[triton]")].ratio_to_floor is None
    assert by_key[("decode", "naive")].ratio_to_floor == pytest.approx(3.0)
    assert by_key[("decode", "naive")].speedup_over_peft is None  # no PEFT row in that group


def test_format_table_shows_groups_values_and_reasons():
    rows = [_row("base", 2.0), _row("peft", 4.0), _row("lorafast[triton]", None, status="skipped: needs CUDA")]
    rows.append(_row("peft", 1.0, mode="decode"))
    fill_relative_metrics(rows)
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["case", "mode", "provider"]
    assert "2.000 [1.800, 2.200]" in lines[2]
    assert lines[2].split()[6:8] == ["1.00", "2.00"]  # x floor (the base itself), x PEFT (4 ms / 2 ms)
    assert lines[4].rstrip().endswith("skipped: needs CUDA")
    assert set(lines[5]) == {"-"}  # rule between (case, mode) groups
    assert lines[6].split()[-4:] == ["n/a", "n/a", "n/a", "n/a"]  # % copy BW, tok/s, peak and saved MiB unknown


def test_lorafast_triton_rows_name_the_kernels_dispatched_to(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend on the CPU, as conftest.py sets
    triton, torch_backend = benchmark_suite.LorafastProvider("triton"), benchmark_suite.LorafastProvider("torch")
    cpu = torch.device("cpu")
    training, decode = LayerCase(64, 96, 256, 8, 0.1), LayerCase(64, 96, 1, 8, 0.0)
    # on the interpreter choose_main_gemm picks the Triton GEMM (cuBLAS is CUDA's default)
    assert triton.kernel_path(training, "forward+backward", cpu, torch.float32) == "fwd triton, bwd triton, dA/dB atomic"
    assert triton.kernel_path(training, "inference-unmerged", cpu, torch.float32) == "fwd triton"
    assert triton.kernel_path(decode, "decode", cpu, torch.float32) == "fwd small_m"
    assert triton.kernel_path(training, "inference-merged", cpu, torch.float32) is None
    assert torch_backend.kernel_path(training, "forward", cpu, torch.float32) is None
    monkeypatch.setenv("LORAFAST_REDUCTION", "ordered")
    monkeypatch.setenv("LORAFAST_MAIN_GEMM", "cublas")
    assert triton.kernel_path(training, "backward", cpu, torch.float32) == "fwd cublas, bwd cublas, dA/dB ordered"
    row = _row("lorafast[triton]", 2.0)
    row.kernel_path = "fwd small_m"
    assert format_table([row]).splitlines()[2].rstrip().endswith("fwd small_m")


def test_json_and_csv_round_trip(tmp_path):
    rows = [_row("base", 2.0), _row("peft", None, status="skipped: peft is not installed")]
    write_json(rows, tmp_path / "rows.json", copy_gbps=12.5)
    loaded = json.loads((tmp_path / "rows.json").read_text())
    assert loaded["copy_bandwidth_gbps"] == 12.5
    assert [BenchRow(**row) for row in loaded["rows"]] == rows
    write_csv(rows, tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [row["provider"] for row in read] == ["base", "peft"]
    assert float(read[0]["median_ms"]) == 2.0 and read[1]["median_ms"] == ""
    assert read[1]["status"] == "skipped: peft is not installed"


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "rows.json"
    target.write_text("previous result")
    unserialisable = _row("base", 2.0)
    unserialisable.device = object()
    with pytest.raises(TypeError):
        write_json([unserialisable], target)
    assert target.read_text() == "previous result"
    assert [path.name for path in tmp_path.iterdir()] == ["rows.json"]
    with atomic_output(tmp_path / "new.txt") as handle:
        handle.write("done")
    assert (tmp_path / "new.txt").read_text() == "done"


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.json", (".json",)) == tmp_path / "a.json"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "a.json")
    with pytest.raises(ValueError, match=r"ending in one of \.png"):
        check_output_path(tmp_path / "plot.jpg", (".png", ".svg"))
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path)


# --------------------------------------------------------------------------- CLI


def _tiny_plan(device: torch.device) -> Plan:
    return Plan(
        sweeps=(
            Sweep((LayerCase(64, 48, 32, 4, 0.1),), ("forward+backward",)),
            Sweep((LayerCase(64, 48, 32, 4, 0.0),), ("inference-merged",)),
            Sweep((LayerCase(64, 48, 1, 4, 0.0),), ("decode",)),
        ),
        train_steps=(TrainStepCase(64, 96, 2, 1, layers=1, vocab=128, batch=1, seq=16, rank=4, dropout=0.1),),
        budget=TINY_BUDGET,
    )


def test_cli_bench_quick_writes_rows_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lorafast.bench_cli.quick_plan", _tiny_plan)
    json_path, csv_path, plot_path = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    argv = ["bench", "--quick", "--device", "cpu", "--no-progress", "--json", str(json_path), "--csv", str(csv_path)]
    threads = torch.get_num_threads()
    try:
        assert cli.main([*argv, "--plot", str(plot_path), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(json_path.read_text())["rows"]
    assert all(row[name] for row in rows for name in ENVIRONMENT_FIELDS)
    assert all(row["device"].endswith("(1 threads)") for row in rows)
    status = {(row["mode"], row["provider"]): row["status"] for row in rows}
    for provider in ("base", "naive", "naive+compile", "peft", "lorafast[torch]"):
        assert status[("forward+backward", provider)] == "ok"
    assert status[("forward+backward", "lorafast[triton]")] == "skipped: the Triton backend needs CUDA"
    assert {provider for mode, provider in status if mode == "inference-merged"} == {
        "base", "peft", "lorafast[torch]", "lorafast[triton]",
    }  # fmt: skip
    ok_layer_rows = [row for row in rows if row["status"] == "ok" and row["suite"] == "layer"]
    for row in ok_layer_rows:
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["tflops"] > 0 and row["roofline_fraction"] > 0 and row["ratio_to_floor"] > 0
    train_rows = [row for row in rows if row["mode"] == "train-step" and row["status"] == "ok"]
    assert {row["provider"] for row in train_rows} == {"peft", "lorafast[torch]"}
    assert all(row["tokens_per_s"] > 0 and row["saved_activation_bytes"] > 0 for row in train_rows)
    assert len(list(csv.DictReader(csv_path.open()))) == len(rows)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.startswith("device: CPU") and "skipped: the Triton backend needs CUDA" in out


def test_cli_bench_interrupted_writes_the_finished_cases_and_exits_130(tmp_path, monkeypatch, capsys):
    """SIGINT (bench/gpu_check.sh's stage timeout) during the second case: the first case's rows
    are printed and written, marked incomplete, and the exit status says interrupted."""
    monkeypatch.setattr("lorafast.bench_cli.quick_plan", _tiny_plan)
    real_run_layer_case = Runner.run_layer_case
    cases_started = []

    def interrupt_second_case(self, case, modes):
        cases_started.append(case)
        if len(cases_started) == 2:
            raise KeyboardInterrupt
        return real_run_layer_case(self, case, modes)

    monkeypatch.setattr(Runner, "run_layer_case", interrupt_second_case)
    json_path = tmp_path / "b.json"
    argv = ["bench", "--quick", "--device", "cpu", "--no-progress", "--json", str(json_path)]
    assert cli.main(argv) == 130
    written = json.loads(json_path.read_text())
    assert written["complete"] is False
    assert {(row["mode"], row["status"]) for row in written["rows"] if row["provider"] == "base"} == {
        ("forward+backward", "ok")
    }
    captured = capsys.readouterr()
    assert "interrupted; reporting the" in captured.err and captured.out.startswith("device: CPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cli_bench_cuda_without_gpu_fails_clearly(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_bench_checks_arguments_before_running(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cpu", "--plot", str(tmp_path / "plot.jpg")]) == 2
    assert "ending in one of .png" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "cpu", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err


def test_cuda_timing_takes_enough_samples_for_a_median(monkeypatch):
    """do_bench times ``rep`` ms' worth of calls: 3 calls of a 30 ms training step at rep 100. The
    harness times again with a longer rep until it has ``cuda_min_samples`` and reports the count
    (the fake do_bench stands in for a 30 ms call)."""
    import triton.testing

    reps = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        assert return_mode == "all"
        reps.append(rep)
        return [30.0 + i % 3 for i in range(max(1, int(rep / 30)))]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    timing = benchmark.compare_times({"step": benchmark.Step(lambda: None)}, torch.device("cuda"), TimingBudget())
    assert reps[0] == 100 and len(reps) == 2 and timing["step"].samples >= 20
    assert timing["step"].median_ms == 31.0 and timing["step"].p20_ms == 30.0 and timing["step"].p80_ms == 32.0
    reps.clear()
    fast = benchmark.compare_times({"step": benchmark.Step(lambda: None)}, torch.device("cuda"), TimingBudget(cuda_rep_ms=3000))
    assert len(reps) == 1 and fast["step"].samples == 100


def test_the_full_plan_measures_each_case_and_mode_once():
    """Rows are keyed by (case label, mode): a case in two sweeps (LoRAFusion's 4096² at batch 32 is
    the Llama 4096→4096 case) gave two rows that took each other's base and PEFT medians."""
    from lorafast.benchmark_suite import full_plan

    keys = [(case.label, mode) for sweep in full_plan().sweeps for case in sweep.cases for mode in sweep.modes]
    assert len(keys) == len(set(keys)) and len(keys) > 100
