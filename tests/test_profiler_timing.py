"""The profiler's timing under outside load: fake clocks and fake ops with disturbed samples,
so a busy moment on the machine must not reach a fit or an interference factor."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from afd.scheduler.planner import profiler
from afd.scheduler.planner.profiler import (
    _flush_caches,
    _interference_rounds,
    _timeit,
    fastest,
    interference_ratio,
    layer_timing,
)


def fake_clock(durations: list[float]):
    """A clock whose successive (start, end) readings differ by `durations` in turn."""
    readings, now = [], 0.0
    for d in durations:
        readings += [now, now + d]
        now += d + 1.0
    it = iter(readings)
    return lambda: next(it)


def test_two_thread_points_keep_the_undisturbed_time():
    reps, reduce, passes = layer_timing(threads=2, reps=3)
    # two of three runs stretched by another process: a median would report 0.25
    t = _timeit(lambda: None, reps, reduce, clock=fake_clock([0.300, 0.010, 0.250]))
    assert t == pytest.approx(0.010)
    # a busy stretch that covers a whole pass: another pass, later, keeps each point clean
    assert passes >= 2
    clean = {"expert": [{"pairs": 8, "seconds": 0.002}, {"pairs": 64, "seconds": 0.004}]}
    busy = {"expert": [{"pairs": 9, "seconds": 0.050}, {"pairs": 63, "seconds": 0.090}]}
    mixed = {"expert": [{"pairs": 8, "seconds": 0.003}, {"pairs": 62, "seconds": 0.080}]}
    got = fastest([busy, mixed, clean])
    assert got == {"expert": [clean["expert"][0], clean["expert"][1]]}


def test_one_thread_points_take_the_median():
    reps, reduce, passes = layer_timing(threads=1, reps=3)
    assert passes == 1
    t = _timeit(lambda: None, reps, reduce, clock=fake_clock([0.010, 0.500, 0.012]))
    assert t == pytest.approx(0.012)


def test_one_disturbed_round_does_not_move_the_interference_factor():
    clean = [[0.010, 0.012]] * 4
    # outside load during one round's "both" phase, and during another's solo phase
    assert interference_ratio([*clean, [0.010, 0.040]]) == pytest.approx(1.2)
    assert interference_ratio([*clean, [0.010, 0.040], [0.050, 0.012]]) == pytest.approx(1.2)
    assert interference_ratio([[0.010, 0.009]] * 3) == 1.0  # never a speed-up


class FakeSide:
    """A side whose op takes 1 ms alone and 2 ms while the other side runs; outside load
    stretches every op of the first `both` phase it sees 10x."""

    def __init__(self, busy: dict, role: str):
        self.cfg = SimpleNamespace(n_routed_experts=4)
        self.busy, self.role, self.disturbed = busy, role, True

    def _op(self) -> float:
        other = "expert" if self.role == "attention" else "attention"
        if not self.busy[other]:
            return 0.001
        return 0.020 if self.disturbed else 0.002

    def attention(self, moe, b, c, reps):
        return self._op()

    def expert(self, tokens, held, reps):
        return {"seconds": self._op()}


def test_rounds_alternate_solo_and_both_phases():
    busy = {"attention": False, "expert": False}
    barrier = threading.Barrier(2)
    job = {"interference_point": (8, 16), "interference_rounds": 5, "interference_s": 0.005}
    got: dict[str, list] = {}

    def side(role: str) -> None:
        bench = FakeSide(busy, role)
        wait = barrier.wait

        def phase_wait() -> None:  # the phase after this barrier: mark who runs
            wait()
            n[role] += 1
            phase = ("attention", "expert", "both")[(n[role] - 1) % 3]
            busy[role] = phase in (role, "both")
            if phase == "both" and n[role] > 3:
                bench.disturbed = False  # only the first round's both phase is hit
            wait()

        got[role] = _interference_rounds(role, bench, job, SimpleNamespace(wait=phase_wait))

    n = {"attention": 0, "expert": 0}
    threads = [threading.Thread(target=side, args=(r,)) for r in ("attention", "expert")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for role in ("attention", "expert"):
        rounds = got[role]
        assert len(rounds) == 5
        assert all(solo == pytest.approx(0.001) for solo, _ in rounds)
        assert rounds[0][1] == pytest.approx(0.020) and rounds[1][1] == pytest.approx(0.002)
        assert interference_ratio(rounds) == pytest.approx(2.0)


def test_cache_flush_only_reads():
    """A written flush leaves dirty lines whose write-back the next op pays, which a worker's
    previous layer (reads of weights and KV) never leaves."""
    _flush_caches()
    buf = profiler._FLUSH[0]
    before = buf.data_ptr(), buf._version
    _flush_caches()
    assert (buf.data_ptr(), buf._version) == before
    assert int(buf.count_nonzero()) == 0
