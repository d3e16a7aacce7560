"""Issue 20's federated target on the new defaults: four CartPole-v1 devices, FedAvg and
sequential rounds, 5 seeds, 150k env steps per device.

The target: the global model solved (federated greedy return at 475 on 3 rounds in a row)
at a median of <= 60k env steps per device, and a final return >= 475 at 150k per device on
every seed. The cells are the ``federation`` benchmark's (:mod:`simulations.bench_federation`:
the same runs, tables and curves), restricted to N=4 and run for 60 rounds of 2,500 local
steps, with a federated greedy evaluation (24 episodes, 6 per device) after every round.
Every other setting is fedq's default (TD targets clipped, learning rate decaying to 0 over
150k of each device's own steps) except the ``numpy`` learner backend: the same DQN update
as torch's (tests/test_numpy_backend.py), about 5x faster per round here, which is what
lets 10 runs of 600k env steps each finish in an afternoon on 2 shared cores.

    python -m fedq.simulations.bench federation_n4 --workers 2

The ``federation_n4_every500`` and ``_every250`` variants ask whether shorter rounds keep
the final model at the goal: the same 150k env steps per device in rounds of 500 (300
rounds; FedAvg and sequential) or 250 (600 rounds; FedAvg), evaluated after every round as
above (so "3 rounds in a row" there spans 1,500 or 750 steps per device, not 7,500: compare
them on the final return, not on steps to solved).

    python -m fedq.simulations.bench federation_n4_every500 --workers 2

The ``federation_n4_decay100k`` variant asks whether the model stops swinging when the
learning rate reaches 0 before the budget ends: the same runs with the decay to 0 over
100k of each device's own steps instead of 150k (``learning-rate-decay-steps = 100000``),
so the last 20 rounds train at a rate of 0. A lone device kept its goal only once the rate
decayed (docs/what-we-tried.md); a sequential model takes 4 devices' updates per round, so
at the same rate it moves 4 times as far.

    python -m fedq.simulations.bench federation_n4_decay100k --workers 2

Five seeds cannot tell 5/5 from 2/5 apart with confidence, so the sequential rows of both
schedules have five more seeds (5-9) each, in ``federation_n4_sequential_seeds5_9`` (the
150k decay) and ``federation_n4_decay100k_sequential_seeds5_9``; the 100k schedule has
five more again (10-14) in ``federation_n4_decay100k_sequential_seeds10_14``.

    python -m fedq.simulations.bench federation_n4_sequential_seeds5_9 --workers 2

``federation_n4_fedavg_batch128`` asks whether FedAvg's final model, which the 100k
schedule freezes wherever it is, gets better with half the gradient noise: FedAvg with
batches of 128 instead of 64 (on the default schedule).

    python -m fedq.simulations.bench federation_n4_fedavg_batch128 --workers 2

Five seeds cannot tell batch 128's 4/5 from batch 64's 2/5 either (Fisher p = 0.52), so
both FedAvg rows have ten more seeds, 5-9 and 10-14: ``federation_n4_fedavg_seeds5_9`` and
``_seeds10_14`` (batch 64, the default), ``federation_n4_fedavg_batch128_seeds5_9`` and
``_seeds10_14``.

    python -m fedq.simulations.bench federation_n4_fedavg_batch128_seeds5_9 --workers 2

``federation_n2_n8_sequential`` and ``federation_n2_n8_decay100k_sequential`` ask whether
the sequential schedule generalises beyond four devices: the chain's model takes N
devices' updates per round, so the rate at 0 from 100k own steps might be too late for
N=8 or too early for N=2.

    python -m fedq.simulations.bench federation_n2_n8_decay100k_sequential --workers 2
"""

from __future__ import annotations

from fedq.simulations.bench_federation import cells, summarise
from fedq.simulations.harness import Benchmark, register_benchmark

DEFAULTS = {"strategies": "fedavg,sequential", "clients": "4", "seeds": 5, "first-seed": 0,
            "local-steps": 2500, "max-rounds": 60, "eval-episodes-total": 24,
            "learner": "backend=numpy"}
QUICK = {"clients": "2", "seeds": 1, "local-steps": 50, "max-rounds": 2,
         "eval-episodes-total": 2}
BUDGET_PER_DEVICE = DEFAULTS["local-steps"] * DEFAULTS["max-rounds"]

BENCHMARK = register_benchmark(Benchmark(
    "federation_n4", "issue 20's federated target: N=4 CartPole devices, FedAvg and "
    "sequential, 5 seeds, 150k env steps per device, solved (3 rounds in a row), final, best",
    defaults=DEFAULTS, quick=QUICK, cells=cells, summarise=summarise,
    plot_name="curves.png"))

for _every, _strategies in ((500, "fedavg,sequential"), (250, "fedavg")):
    register_benchmark(Benchmark(
        f"federation_n4_every{_every}", f"federation_n4's {_strategies.replace(',', ' and ')} "
        f"with rounds of {_every} local env steps instead of 2,500, the same 150k per "
        "device: does the final model stay at the goal?",
        defaults={**DEFAULTS, "strategies": _strategies, "local-steps": _every,
                  "max-rounds": BUDGET_PER_DEVICE // _every},
        quick=QUICK, cells=cells, summarise=summarise, plot_name="curves.png"))

DECAY_100K = {**DEFAULTS, "learner": "backend=numpy,learning-rate-decay-steps=100000"}

register_benchmark(Benchmark(
    "federation_n4_decay100k", "federation_n4 with the learning rate decaying to 0 over 100k "
    "of each device's own env steps instead of 150k: does a model that stops learning "
    "before the budget ends stay at the goal?",
    defaults=DECAY_100K, quick=QUICK, cells=cells, summarise=summarise,
    plot_name="curves.png"))

for _name, _base, _firsts in (("federation_n4", DEFAULTS, (5,)),
                              ("federation_n4_decay100k", DECAY_100K, (5, 10))):
    for _first in _firsts:
        register_benchmark(Benchmark(
            f"{_name}_sequential_seeds{_first}_{_first + 4}", f"{_name}'s sequential rounds "
            f"on seeds {_first}-{_first + 4}, five more seeds for the final-return comparison "
            "of the two learning-rate schedules",
            defaults={**_base, "strategies": "sequential", "first-seed": _first},
            quick=QUICK, cells=cells, summarise=summarise, plot_name="curves.png"))

BATCH_128 = {**DEFAULTS, "strategies": "fedavg", "learner": "backend=numpy,batch-size=128"}

register_benchmark(Benchmark(
    "federation_n4_fedavg_batch128", "federation_n4's FedAvg with batches of 128 instead of "
    "64: does less gradient noise keep the averaged model at the goal?",
    defaults=BATCH_128, quick=QUICK, cells=cells, summarise=summarise, plot_name="curves.png"))

for _name, _base in (("federation_n4_fedavg", {**DEFAULTS, "strategies": "fedavg"}),
                     ("federation_n4_fedavg_batch128", BATCH_128)):
    for _first in (5, 10):
        register_benchmark(Benchmark(
            f"{_name}_seeds{_first}_{_first + 4}", f"{_name}'s FedAvg rounds on seeds "
            f"{_first}-{_first + 4}, five more seeds for the final-return comparison of "
            "batches of 64 and 128",
            defaults={**_base, "first-seed": _first},
            quick=QUICK, cells=cells, summarise=summarise, plot_name="curves.png"))

for _name, _base in (("federation_n2_n8_sequential", DEFAULTS),
                     ("federation_n2_n8_decay100k_sequential", DECAY_100K)):
    register_benchmark(Benchmark(
        _name, f"{'federation_n4_decay100k' if _base is DECAY_100K else 'federation_n4'}'s "
        "sequential rounds with 2 and 8 devices instead of 4: how does the schedule that "
        "raised N=4's chain's final return (the rate at 0 from two thirds of each device's "
        "budget) do at other chain lengths?",
        defaults={**_base, "strategies": "sequential", "clients": "2,8"},
        quick=QUICK, cells=cells, summarise=summarise, plot_name="curves.png"))
