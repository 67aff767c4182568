"""bench/targets.py: issue 3's targets judged from a GPU check's JSON files."""

from __future__ import annotations

import json

import pytest
from bench_scripts import BENCH, load_bench_script

RESULTS = BENCH / "results"


@pytest.fixture(scope="module")
def targets():
    return load_bench_script("targets")


def _train_row(M, over_base, over_base_graph, over_peft):
    return {"M": M, "K": 4096, "N": 4096, "fused_over_base": over_base, "fused_over_base_graph": over_base_graph,
            "speedup_vs_peft": over_peft}  # fmt: skip


def _decode_row(M, eager, graph):
    return {"M": M, "K": 4096, "N": 4096, "fused_over_merged": eager, "fused_over_merged_graph": graph}


def _layer_row(provider, saved, tokens=8192, in_features=4096, rank=16, dtype="bfloat16"):
    return {"suite": "layer", "mode": "forward+backward", "provider": provider, "case": "c", "dtype": dtype,
            "tokens": tokens, "in_features": in_features, "rank": rank, "saved_activation_bytes": saved}  # fmt: skip


def _verdicts(report):
    """{(target, basis): verdict} over the report's targets."""
    return {(item["target"], basis): verdict for item in report["targets"] for basis, verdict in item["verdicts"].items()}


EAGER, GRAPH = "eager calls", "GPU time (CUDA graphs)"


def test_the_first_h200_run_met_none_of_the_targets(targets):
    """The committed H200 results of 2026-11-28: 1.29-4.39x the base, 1.24-1.75x PEFT, decode
    2.4-5x merged (eager only: no graph times then), and 8 bytes over the activation limit (the
    dropout seed was still saved as a tensor)."""
    report = targets.judge(
        json.loads((RESULTS / "h200_kernel_bench.json").read_text()), json.loads((RESULTS / "h200_bench.json").read_text())
    )
    assert report["device"] == "NVIDIA H200"
    verdicts = _verdicts(report)
    assert {basis: verdict for (_, basis), verdict in verdicts.items() if basis == GRAPH} == {GRAPH: "not measured"}
    assert {verdict for (_, basis), verdict in verdicts.items() if basis != GRAPH} == {"NOT met"}
    by_name = {item["target"]: item["measured"] for item in report["targets"]}
    assert "M=8192 K=4096 N=4096: 1.59x" in by_name["fwd+bwd / frozen base"][EAGER]
    assert by_name["decode (M = 1...16) / merged"][EAGER].startswith("M=1 K=4096 N=4096: 2.39x")
    assert "+8 B" in by_name["saved activations per layer"]["bytes"]
    assert report["info"][0]["measured"][EAGER].startswith("0.76x")


def test_every_target_met_and_each_limit_is_inclusive(targets):
    kernel_bench = {
        "device": "NVIDIA H100 80GB HBM3",
        "train": [_train_row(8192, 1.15, 1.1, 1.4), _train_row(2048, 1.05, 1.0, 2.0)],
        "decode": [_decode_row(1, 3.0, 1.1), _decode_row(16, 3.0, 1.02)],
    }
    limit = 8192 * 4096 * 2 + 8192 * 16 * 4
    bench = {"rows": [_layer_row("lorafast[triton]", limit), _layer_row("lorafast[torch]", limit - 8)]}
    report = targets.judge(kernel_bench, bench)
    verdicts = _verdicts(report)
    assert verdicts.pop(("decode (M = 1...16) / merged", EAGER)) == "NOT met"  # 3x eagerly: host-bound
    assert set(verdicts.values()) == {"met"}, report


@pytest.mark.parametrize(
    "change",
    ["base ratio on one shape", "PEFT speed-up on one shape", "decode graph ratio", "one saved byte"],
)
def test_one_shape_over_its_limit_fails_its_target(targets, change):
    train = [_train_row(8192, 1.1, 1.1, 1.5), _train_row(2048, 1.1, 1.1, 1.5)]
    decode = [_decode_row(1, 1.0, 1.0), _decode_row(4, 1.0, 1.0)]
    limit = 8192 * 4096 * 2 + 8192 * 16 * 4
    layer_rows = [_layer_row("lorafast[triton]", limit)]
    expected = {
        "base ratio on one shape": ("fwd+bwd / frozen base", EAGER),
        "PEFT speed-up on one shape": ("speed-up over PEFT's layer", EAGER),
        "decode graph ratio": ("decode (M = 1...16) / merged", GRAPH),
        "one saved byte": ("saved activations per layer", "bytes"),
    }[change]
    if change == "base ratio on one shape":
        train[1]["fused_over_base"] = 1.16
    elif change == "PEFT speed-up on one shape":
        train[0]["speedup_vs_peft"] = 1.39
    elif change == "decode graph ratio":
        decode[1]["fused_over_merged_graph"] = 1.11
    else:
        layer_rows[0]["saved_activation_bytes"] += 1
    report = targets.judge({"train": train, "decode": decode}, {"rows": layer_rows})
    verdicts = _verdicts(report)
    assert verdicts.pop(expected) == "NOT met"
    assert set(verdicts.values()) == {"met"}


def test_the_activation_limit_counts_x_in_its_own_dtype(targets):
    fp32_limit = 8192 * 4096 * 4 + 8192 * 16 * 4
    at_limit = targets.saved_activation_target({"rows": [_layer_row("lorafast[triton]", fp32_limit, dtype="float32")]})
    as_bf16 = targets.saved_activation_target({"rows": [_layer_row("lorafast[triton]", fp32_limit, dtype="bfloat16")]})
    assert (at_limit["verdicts"], as_bf16["verdicts"]) == ({"bytes": "met"}, {"bytes": "NOT met"})


def test_a_shape_without_a_graph_time_leaves_the_gpu_time_verdict_unmeasured(targets):
    """A failed capture leaves ``fused_over_merged_graph`` None: the shapes that have one do not
    make a verdict for all of them."""
    decode = [_decode_row(1, 1.05, 1.0), _decode_row(4, 1.2, None)]
    target = targets.decode_target({"decode": decode})
    assert target["verdicts"] == {EAGER: "NOT met", GRAPH: "not measured"}
    assert target["measured"][GRAPH] == "M=1 K=4096 N=4096: 1.00x"


def test_nothing_measured_is_never_met(targets, tmp_path, capsys):
    assert targets.main([str(tmp_path), "--json", str(tmp_path / "verdicts.json")]) == 0
    report = json.loads((tmp_path / "verdicts.json").read_text())
    assert set(_verdicts(report).values()) == {"not measured"}
    assert "fwd+bwd / frozen base (<= 1.15):\n    [not measured] eager calls: -" in capsys.readouterr().out
