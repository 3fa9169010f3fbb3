"""`afd bench peer` and its profile folding: the harness's own logic without vLLM (client result
parsing, alternating rounds, ratios, agreement, py-spy folding, process clean-up), and the AFD
side end to end with tiny counts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from afd.benchmarks import peer
from afd.benchmarks.profile_serve import COMPONENTS, FOLD_RULES, classify, fold, parse_raw
from afd.entrypoints.cli import main

# what `vllm bench serve --save-result` (0.32.0) wrote for a run, trimmed to a few keys of each
VLLM_RESULT = {
    "date": "20261203-140247",
    "backend": "openai",
    "model_id": "M",
    "num_prompts": 64,
    "request_rate": "inf",
    "max_concurrency": 16,
    "duration": 3.871,
    "completed": 64,
    "failed": 0,
    "total_input_tokens": 8223,
    "total_output_tokens": 4096,
    "request_throughput": 16.53,
    "request_goodput": 16.53,
    "output_throughput": 1058.08,
    "total_token_throughput": 3182.26,
    "latencies": [0.96, 0.98],
    "mean_ttft_ms": 313.2,
    "median_ttft_ms": 324.8,
    "p99_ttft_ms": 365.1,
    "mean_tpot_ms": 10.35,
    "median_tpot_ms": 10.16,
    "median_itl_ms": 9.78,
}


def test_client_figures_reads_vllm_and_afd_results():
    f = peer.client_figures(VLLM_RESULT)
    assert f["output_tok_s"] == 1058.08 and f["median_ttft_ms"] == 324.8
    assert f["median_tpot_ms"] == 10.16 and f["goodput_req_s"] == 16.53
    assert f["completed"] == 64 and f["total_input_tokens"] == 8223
    # afd bench serve writes the same names
    from afd.benchmarks.serve import RequestResult, RequestSpec, compute_metrics

    specs = [RequestSpec("a b", 2, 3)] * 2
    results = [RequestResult(True, "", 2, 3, 0.1, 0.3, [0.1, 0.1], 0.0)] * 2
    m = compute_metrics(specs, results, 1.0, {"ttft": 1000, "tpot": 100}, [50.0])
    g = peer.client_figures(m)
    assert g["output_tok_s"] == 6.0 and g["goodput_req_s"] == 2.0
    assert g["median_tpot_ms"] == pytest.approx(100.0)
    broken = {k: v for k, v in VLLM_RESULT.items() if k != "median_tpot_ms"}
    with pytest.raises(ValueError, match="median_tpot_ms"):
        peer.client_figures(broken)


def test_schedule_alternates_sides_round_by_round():
    assert peer.schedule(["afd", "vllm"], 3) == [
        (0, "afd"), (0, "vllm"), (1, "afd"), (1, "vllm"), (2, "afd"), (2, "vllm")
    ]  # fmt: skip
    assert peer.schedule(["a"], 1) == [(0, "a")]
    assert peer.schedule(["a", "b"], 0) == []


def _row(r, side, tok_s, tpot, ttft=100.0, goodput=5.0):
    figs = dict(output_tok_s=tok_s, median_tpot_ms=tpot, median_ttft_ms=ttft,
                goodput_req_s=goodput)  # fmt: skip
    return {"round": r, "side": side, "figures": figs}


def test_summarise_medians_and_same_round_ratios():
    rounds = [
        _row(0, "afd", 300, 50), _row(0, "vllm", 1000, 10),
        _row(1, "afd", 600, 20), _row(1, "vllm", 1200, 10),
        _row(2, "afd", 450, 30), _row(2, "vllm", 900, 12),
    ]  # fmt: skip
    s = peer.summarise(rounds, ["afd", "vllm"])
    assert s["sides"]["afd"]["output_tok_s"] == 450
    assert s["sides"]["afd"]["output_tok_s_per_round"] == [300, 600, 450]
    assert s["sides"]["vllm"]["median_tpot_ms"] == 10
    v = s["vs_vllm"]["afd"]
    # each AFD round against vLLM's figure of the same round, not against vLLM's median
    assert v["output_tok_s_ratio_per_round"] == [0.3, 0.5, 0.5]
    assert v["median_tpot_ratio_per_round"] == [5.0, 2.0, 2.5]
    assert v["output_tok_s_ratio"] == 0.5 and v["median_tpot_ratio"] == 2.5
    assert "vllm" not in s["vs_vllm"]
    # a side without vLLM rounds has no ratios; a failed round (no figures) counts for nothing
    alone = peer.summarise([_row(0, "afd", 10, 5), {"round": 1, "side": "afd"}], ["afd"])
    assert alone["vs_vllm"] == {} and alone["sides"]["afd"]["rounds"] == 1


def test_parity_within_and_beyond_tolerance():
    a = dict(output_tok_s=1000.0, median_ttft_ms=200.0, median_tpot_ms=10.0)
    close = dict(output_tok_s=1050.0, median_ttft_ms=190.0, median_tpot_ms=10.5)
    p = peer.parity(a, close, 0.1)
    assert p["same_figures"] and p["afd_over_vllm"]["output_tok_s"] == pytest.approx(1.05)
    far = dict(close, median_tpot_ms=12.0)
    assert not peer.parity(a, far, 0.1)["same_figures"]
    assert not peer.parity(dict(a, median_ttft_ms=0.0), close, 0.1)["same_figures"]


def test_thread_counts_from_logs():
    log = (
        "(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
        "(EngineCore pid=1) INFO [torch_utils.py:295] Reducing Torch threads from 2 to 1 for "
        "serving. Set OMP_NUM_THREADS in the external environment to override.\n"
    )
    assert peer.vllm_threads(log) == 1
    assert peer.vllm_threads("\tlocal_rank=0, core ids=[0, 1]\n") == 2
    assert peer.vllm_threads("nothing here") is None
    t = peer.afd_threads("afd: plan: single process, device=cpu\n", 2)
    assert t == {"reported": None, "log_lines": [], "torch_default": 2}
    t = peer.afd_threads("afd: plan: single process, threads=2 (of 2 cores)\nready\n", 1)
    assert t["reported"] == 2 and t["log_lines"] == ["afd: plan: single process, threads=2 (of "
                                                     "2 cores)"]  # fmt: skip
    assert peer.afd_threads("engine: 3 torch threads\n", 1)["reported"] == 3


def test_agreement_counts_prompts_and_first_difference():
    a = [[1, 2, 3], [4, 5, 6], [7, 8]]
    b = [[1, 2, 3], [4, 9, 6], [7, 8, 9]]
    g = peer.agreement(a, b)
    assert g["prompts"] == 3 and g["agree"] == 1
    assert g["differ"] == [
        {"prompt": 1, "first_difference_at": 1},
        {"prompt": 2, "first_difference_at": 2},
    ]
    with pytest.raises(ValueError):
        peer.agreement(a, b[:2])


def _offline(tok_s: float, tokens: list[list[int]], reference=None) -> dict:
    w = {"output_tok_s": tok_s, "tokens": tokens}
    if reference is not None:
        w["reference_tokens"] = reference
    return {"workloads": {"w": w}, "command": "c", "version": "v", "torch_threads": 1,
            "load_s": 1.0}  # fmt: skip


def test_offline_summary_ratios_agreement_and_determinism():
    runs = {
        "afd": [_offline(500, [[1, 2], [3, 4]]), _offline(700, [[1, 2], [3, 4]])],
        "vllm": [_offline(1000, [[1, 2], [3, 5]]), _offline(1000, [[1, 2], [3, 5]])],
        "transformers": [_offline(250, [[1, 9], [3, 4]], reference=[[1, 2], [3, 4]]),
                         _offline(350, [[1, 9], [3, 3]])],
    }  # fmt: skip
    (row,) = peer.offline_summary(runs, ["w"])["table"]
    assert row["afd_tok_s"] == 600 and row["afd_over_vllm_per_round"] == [0.5, 0.7]
    assert row["afd_over_transformers_per_round"] == [2.0, 2.0]
    a = row["agreement"]
    assert a["afd_vs_vllm"]["agree"] == 1 and a["afd_vs_transformers"]["agree"] == 1
    assert a["afd_vs_transformers_unpadded"]["agree"] == 2
    assert a["vllm_vs_transformers_unpadded"]["differ"] == [{"prompt": 1, "first_difference_at": 1}]
    assert row["deterministic"] == {"afd": True, "vllm": True, "transformers": False}


def test_parse_side_and_workload_edges():
    s = peer.parse_side("colo=--num-attention-workers 0 --num-expert-workers 0")
    assert s.label == "colo" and s.engine == "afd" and s.args[-1] == "0"
    assert peer.parse_side("plain=").args == []
    for bad in ("", "=x", "nolabel", "vllm=--x", "é=--x", "a b=--x", "x" * 50 + "=", "\ud800=x"):
        with pytest.raises(ValueError):
            peer.parse_side(bad)
    assert peer.parse_workload("decode-heavy=64:16-48:128") == (
        "decode-heavy", {"num": 64, "min_len": 16, "max_len": 48, "max_tokens": 128}
    )  # fmt: skip
    for bad in ("p=0:1-2:3", "p=1:5-2:3", "p=1:0-2:3", "p=1:1-2:0", "p=-1:1-2:3", "p=1:1-2",
                "p=nan:1-2:3", f"p={2**64}:1-2:3", "", "p=1:1-2:3:4", "ü=1:1-2:3"):  # fmt: skip
        with pytest.raises(ValueError):
            peer.parse_workload(bad)


def test_random_prompts_are_reproducible_and_bounded():
    spec = {"num": 20, "min_len": 3, "max_len": 9, "max_tokens": 4}
    a = peer.random_prompts([5, 6, 7], spec, seed=1)
    assert a == peer.random_prompts([5, 6, 7], spec, seed=1)
    assert a != peer.random_prompts([5, 6, 7], spec, seed=2)
    assert len(a) == 20 and all(3 <= len(p) <= 9 and set(p) <= {5, 6, 7} for p in a)


def test_cli_rejects_bad_values_in_one_line(capsys, tmp_path):
    for argv in (["--rounds", "0"], ["--num-prompts", "-1"], ["--random-output-len", "1"],
                 ["--kv-cache-gib", "nan"], ["--profile-rate", "0"],
                 ["--random-input-len", "1000", "--max-model-len", "1024"],
                 ["--afd", "bad label=x"], ["--model", "no-such-model"],
                 ["--afd-python", f"nosuchside={sys.executable}"],
                 ["--vllm-venv", str(tmp_path)]):  # fmt: skip
        assert main(["bench", "peer", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("afd: error:"), (argv, err)


# ---- profile folding ---------------------------------------------------------------------------

RAW = "\n".join([
    'process 10:"python -m afd serve m";thread (11): afd-engine;Thread.run (threading.py:982);'
    "AsyncEngine._loop (afd/engine/async_engine.py:120);LLMEngine.step (afd/engine/llm_engine."
    "py:330);MoEForCausalLM.forward (afd/models/model.py:170);MoE.forward (afd/models/layers.py:"
    "260);fused_moe (kernels/ops.py:80);fused_moe (kernels/torch_ops.py:45) 40",
    'process 10:"python -m afd serve m";thread (11): afd-engine;LLMEngine.step (afd/engine/'
    "llm_engine.py:330);GQAAttention.forward (afd/models/attention.py:50);paged_decode_attention "
    "(kernels/torch_ops.py:230) 20",
    'process 10:"python -m afd serve m";thread (11): afd-engine;LLMEngine.step (afd/engine/'
    "llm_engine.py:330);prepare_inputs (afd/engine/model_runner.py:50) 5",
    'process 10:"python -m afd serve m";thread (11): afd-engine;LLMEngine.step (afd/engine/'
    "llm_engine.py:330);IncrementalDetokenizer.add_token (afd/tokenizer.py:430) 3",
    'process 10:"python -m afd serve m";thread (12): MainThread;Server.run (uvicorn/server.py:'
    "60);H11Protocol.data_received (uvicorn/protocols/http/h11_impl.py:200) 10",
    'process 10:"python -m afd serve m";thread (12): MainThread;Condition.wait (threading.py:'
    "320) 2",
    'process 20:"python -c spawn";thread (21): MainThread;AttentionWorker.step (attention_nodes/'
    "worker.py:140);ShmTransport.dispatch (comm/shm_transport.py:340) 15",
    'process 20:"python -c spawn";thread (21): MainThread;mystery (somewhere.py:1) 5',
    "garbage line without a count",
    "",
])  # fmt: skip


def test_parse_raw_reads_roots_frames_and_counts():
    samples = parse_raw(RAW)
    assert len(samples) == 8 and sum(s.count for s in samples) == 100
    s = samples[0]
    assert s.process == '10:"python -m afd serve m"' and s.thread == "thread (11): afd-engine"
    assert s.frames[0] == ("Thread.run", "threading.py")
    assert s.frames[-1] == ("fused_moe", "kernels/torch_ops.py")
    assert parse_raw("a;b (x.py:1) 3")[0].frames == [("a", ""), ("b", "x.py")]


def test_fold_assigns_the_innermost_matching_frame():
    f = fold(parse_raw(RAW))
    shares = {c["component"]: c["share"] for c in f["components"]}
    assert f["samples"] == 100
    assert shares == {"MoE": 0.4, "attention": 0.2, "transport": 0.15, "HTTP and streaming": 0.1,
                      "input building": 0.05, "other": 0.05, "detokenization": 0.03,
                      "waits": 0.02}  # fmt: skip
    assert f["top_frames"][0]["frame"] == "fused_moe (kernels/torch_ops.py)"
    roles = {p["process"]: p["role"] for p in f["processes"]}
    assert roles == {'10:"python -m afd serve m"': "server (HTTP + engine)",
                     '20:"python -c spawn"': "attention worker"}  # fmt: skip
    assert sum(p["samples"] for p in f["processes"]) == 100
    assert fold([])["samples"] == 0 and fold([])["components"] == []


def test_fold_rules_name_only_known_components():
    assert {rule[0] for rule in FOLD_RULES} <= set(COMPONENTS)
    # a torch module frame decides nothing: the afd frame under it does
    frames = [("LLMEngine.step", "afd/engine/llm_engine.py"),
              ("Sampler.forward", "afd/sampling/sampler.py"),
              ("Module._call_impl", "torch/nn/modules/module.py")]  # fmt: skip
    assert classify(frames) == ("sampling", "Sampler.forward (afd/sampling/sampler.py)")
    assert classify([]) == ("other", "<no python frame> ()")


# ---- processes ---------------------------------------------------------------------------------

# answers 200 on every GET and keeps a child process of its own, as a server's workers
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print("child", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] != "Z"


def test_server_stop_leaves_no_process_of_its_group(tmp_path):
    port = peer.free_port()
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVER)
    server = peer.Server([sys.executable, str(script), str(port)], dict(os.environ), port,
                         tmp_path / "fake.log")  # fmt: skip
    try:
        assert server.start(60) > 0
        leader = server.proc.pid
        deadline = time.monotonic() + 30
        while "child" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(server.log.read_text().split()[1])
        assert _alive(child)
    finally:
        server.stop()
    assert server.proc is None and not _alive(leader) and not _alive(child)
    server.stop()  # stopping twice is harmless


def test_group_cpu_counts_every_process_of_the_server_group(tmp_path):
    port = peer.free_port()
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVER)
    server = peer.Server([sys.executable, str(script), str(port)], dict(os.environ), port,
                         tmp_path / "fake.log")  # fmt: skip
    try:
        server.start(60)
        leader = server.proc.pid
        deadline = time.monotonic() + 30
        while "child" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(server.log.read_text().split()[1])
        before = peer.group_cpu_s(leader)
        assert {leader, child} <= set(before) and str(script) in before[leader][0]
        after = {pid: (cmd, cpu + 0.5) for pid, (cmd, cpu) in before.items()}
        after[12345678] = ("late", 1.0)  # started during the run: all its CPU counts
        use = peer.cpu_use(before, after, {"total_output_tokens": 500}, leader)
    finally:
        server.stop()
    first = use["processes"][0]
    assert first["pid"] == leader and first["leader"] and first["cpu_s"] == pytest.approx(0.5)
    assert first["cpu_s_per_1k_tokens"] == pytest.approx(1.0)
    assert use["total_cpu_s"] == pytest.approx(0.5 * len(before) + 1.0)
    assert peer.cpu_use({}, {}, {"total_output_tokens": 0}, 1)["total_cpu_s_per_1k_tokens"] is None


def test_server_that_exits_fails_start_with_its_log(tmp_path):
    port = peer.free_port()
    cmd = [sys.executable, "-c", "import sys; print('cannot load model'); sys.exit(3)"]
    server = peer.Server(cmd, dict(os.environ), port, tmp_path / "x.log")
    try:
        with pytest.raises(RuntimeError, match="exited \\(3\\)[\\s\\S]*cannot load model"):
            server.start(60)
    finally:
        server.stop()


def test_run_bounded_kills_at_timeout(tmp_path):
    with pytest.raises(RuntimeError, match="timed out after 0.5 s"):
        peer.run_bounded([sys.executable, "-c", "import time; time.sleep(60)"],
                         dict(os.environ), tmp_path / "t.log", 0.5)  # fmt: skip
    with pytest.raises(RuntimeError, match="exit 4[\\s\\S]*boom"):
        peer.run_bounded([sys.executable, "-c", "print('boom'); raise SystemExit(4)"],
                         dict(os.environ), tmp_path / "e.log", 30)  # fmt: skip
    peer.run_bounded([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "ok.log", 30)


# ---- the AFD side end to end -------------------------------------------------------------------

TINY = ["--model", "tiny-qwen3-moe", "--no-vllm", "--client", "afd", "--rounds", "2",
        "--num-prompts", "4", "--max-concurrency", "2", "--random-input-len", "16",
        "--random-output-len", "4", "--warmup-prompts", "2", "--startup-timeout", "240",
        "--run-timeout", "240"]  # fmt: skip
COLOCATED = "colo=--num-attention-workers 0 --num-expert-workers 0 --num-prefill-workers 0"


@pytest.mark.slow
def test_bench_peer_afd_side_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFD_ALLOW_DIRTY", "1")  # results of a test name no commit
    out = tmp_path / "peer.json"
    argv = ["bench", "peer", *TINY, "--mode", "both", "--afd", COLOCATED,
            "--afd-python", f"colo={sys.executable}",
            "--offline-workload", "p=3:5-20:4", "--offline-engines", "afd,transformers",
            "--output", str(out), "--log-dir", str(tmp_path / "logs")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("afd bench peer") and data["commit"]
    assert [(r["round"], r["side"]) for r in data["serve"]["rounds"]] == [(0, "colo"), (1, "colo")]
    for r in data["serve"]["rounds"]:
        assert r["figures"]["completed"] == 4 and r["figures"]["failed"] == 0
        assert r["figures"]["total_output_tokens"] == 16
        assert r["torch_threads"]["torch_default"] >= 1
        cpu = r["server_cpu"]  # the API process first, then the engine core
        assert cpu["processes"][0]["leader"] and cpu["total_cpu_s"] > 0
    (row,) = data["serve"]["table"]
    assert row["side"] == "colo" and row["rounds"] == 2 and row["output_tok_s"] > 0
    assert "afd serve" in row["command"] and "--num-attention-workers 0" in row["command"]
    (w,) = data["offline"]["table"]
    assert w["workload"] == "p" and len(w["afd_tok_s_per_round"]) == 2
    assert w["afd_over_transformers"] > 0
    # against transformers one prompt at a time (a padded batch may flip a near tie)
    assert w["agreement"]["afd_vs_transformers_unpadded"]["agree"] == 3
    assert w["agreement"]["afd_vs_transformers"]["prompts"] == 3
    assert w["deterministic"] == {"afd": True, "transformers": True}
    assert "peer_offline.py afd" in data["offline"]["engine_runs"]["afd"]["command"]
    assert "colo" in capsys.readouterr().out
    # one server start per round, each stopped (its log ends with AFD's stop line)
    logs = sorted((tmp_path / "logs").glob("*.server.log"))
    assert len(logs) == 2 and all("afd: stopped" in log.read_text() for log in logs)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None,
                    reason="py-spy is the bench/test extra")  # fmt: skip
def test_bench_peer_profile_folds_a_colocated_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AFD_ALLOW_DIRTY", "1")
    out = tmp_path / "profile.json"
    argv = ["bench", "peer", *TINY, "--num-prompts", "8", "--random-output-len", "16",
            "--profile", "--afd", COLOCATED, "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    (p,) = json.loads(out.read_text())["profiles"]
    assert p["side"] == "colo" and p["samples"] > 0 and "py-spy record" in p["py_spy_command"]
    shares = {c["component"]: c["share"] for c in p["components"]}
    assert sum(shares.values()) == pytest.approx(1.0)
    # the engine's model compute shows up under the model's components
    assert shares.get("MoE", 0) + shares.get("attention", 0) + shares.get("dense layers", 0) > 0


def test_peer_models_have_shapes_vllm_cpu_loads():
    from afd.benchmarks.peer_models import PEER_MODELS

    assert {"peer-qwen3-moe", "peer-attention-heavy", "peer-expert-heavy"} <= set(PEER_MODELS)
    for shape in PEER_MODELS.values():
        assert shape["head_dim"] >= 32  # vLLM's CPU attention refuses 16
    issue = PEER_MODELS["peer-qwen3-moe"]
    assert (issue["hidden_size"], issue["num_hidden_layers"]) == (256, 4)
    assert (issue["num_experts"], issue["num_experts_per_tok"]) == (16, 4)
    heavy_a, heavy_f = PEER_MODELS["peer-attention-heavy"], PEER_MODELS["peer-expert-heavy"]
    assert heavy_a["num_key_value_heads"] > issue["num_key_value_heads"]
    assert heavy_f["moe_intermediate_size"] * heavy_f["num_experts_per_tok"] > (
        issue["moe_intermediate_size"] * issue["num_experts_per_tok"]
    )
