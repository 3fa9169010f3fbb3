"""Torch intra-op threads per process (afd.threads, issue 20): the colocated engine takes the
cores, a cluster splits them among a node's workers, --num-threads-per-worker overrides, and
the start-up line says which."""

from __future__ import annotations

import pytest

from afd.config import ClusterConfig
from afd.entrypoints.cli import main
from afd.threads import available_cores, thread_plan


@pytest.fixture(autouse=True)
def _no_omp_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # conftest pins 1 for the suite


def test_omp_num_threads_caps_the_choice_and_the_flag_overrides_it(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_plan(_cluster(), cores=16).engine == 1
    assert thread_plan(_cluster(1, 1, 1), cores=16).worker == 1
    assert thread_plan(_cluster(num_threads_per_worker=4), cores=16).engine == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: ignored, as torch ignores it
    assert thread_plan(_cluster(), cores=16).engine == 16


def _cluster(p: int = 0, a: int = 0, f: int = 0, **kw) -> ClusterConfig:
    return ClusterConfig(num_prefill_workers=p, num_attention_workers=a, num_expert_workers=f,
                         **kw)  # fmt: skip


@pytest.mark.parametrize(
    "pools,cores,engine,worker,workers",
    [
        ((0, 0, 0), 2, 2, 0, 0),  # colocated: all cores to the engine
        ((0, 0, 0), 16, 16, 0, 0),
        ((1, 1, 1), 2, 1, 1, 3),  # fewer cores than workers: 1 each, never 0
        ((0, 1, 1), 16, 1, 8, 2),  # the driver schedules only: 1
        ((2, 2, 4), 16, 1, 2, 8),
        ((1, 1, 1), 7, 1, 2, 3),  # the remainder stays free (the driver, the API server)
    ],
)
def test_chosen_threads(pools, cores, engine, worker, workers):
    plan = thread_plan(_cluster(*pools), cores)
    assert (plan.engine, plan.worker, plan.workers, plan.given) == (engine, worker, workers, False)


def test_the_flag_overrides_the_model_processes_only():
    plan = thread_plan(_cluster(num_threads_per_worker=3), 2)
    assert (plan.engine, plan.given) == (3, True)
    plan = thread_plan(_cluster(1, 1, 1, num_threads_per_worker=4), 2)
    assert (plan.engine, plan.worker) == (1, 4)


def test_several_nodes_split_each_nodes_cores():
    cluster = _cluster(0, 2, 2, nnodes=2, dist_init_addr="10.0.0.1:29500")
    assert thread_plan(cluster, 8).worker == 4


def test_the_start_up_words():
    assert thread_plan(_cluster(), 2).describe() == "threads=2 (of 2 cores)"
    words = thread_plan(_cluster(1, 1, 1), 2).describe()
    assert words == "threads=1 per worker x 3 (of 2 cores; driver 1, API 1)"
    given = thread_plan(_cluster(num_threads_per_worker=5), 2).describe()
    assert given == "threads=5 (--num-threads-per-worker)"


def test_available_cores_is_this_process_affinity():
    assert 1 <= available_cores()


@pytest.mark.parametrize(
    "value,words",
    [
        ("0", "--num-threads-per-worker must be at least 1"),
        ("-1", "--num-threads-per-worker must be at least 1"),
        ("100000", "--num-threads-per-worker must be at most 1024"),
        ("two", "'two' is not an integer"),
        ("1.5", "'1.5' is not an integer"),
    ],
)
def test_bad_thread_counts_are_one_line_errors(value, words, capsys):
    assert main(["serve", "--num-threads-per-worker", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afd: error: ") and err.count("\n") == 1, err
    assert words in err, err
