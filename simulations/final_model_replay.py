"""Score each federated run's *final* global model on many fresh greedy episodes.

A federation benchmark's "final return" is the last round's federated evaluation: 24
episodes split over the devices, which for a policy near the goal swings by tens of points
from one evaluation to the next (docs/benchmarks.md: one frozen model scored 335-487 over
44 rounds). Whether the final model itself is at the goal needs more episodes than that.
This replays the latest round's checkpoint of every run of a committed federation
benchmark from the harness cache (``runs/harness/federated-run/<fingerprint>.work``, so
only on the machine that ran the cells) on ``--episodes`` fresh greedy episodes with the
scoring seed of ``best.pt``'s replay, and writes ``final_model_replay.json`` / ``.md``
beside the benchmark's results, with the cell fingerprints it scored (a regenerated
benchmark makes them stale). It reads results; it runs no cell.

    python -m fedq.simulations.final_model_replay federation_n4_every500 federation_n4_every250
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedq.common.atomic import atomic_write_text
from fedq.simulations.federated_cell import _play
from fedq.simulations.harness import CACHE_ROOT
from fedq.simulations.results_io import markdown_table, spread

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 475.0


def final_checkpoint(run_dir: Path) -> Path | None:
    """The latest ``round-NNNN.pt`` of a run (what the run ended with), or None."""
    rounds = sorted((run_dir / "checkpoints").glob("round-*.pt"))
    return rounds[-1] if rounds else None


def replay(benchmark: str, episodes: int, cache_root: Path = CACHE_ROOT,
           results_root: Path = RESULTS) -> list[dict[str, Any]]:
    """One row per run of ``benchmark``'s committed cells: its final model's return, or
    why it has none (no cached work dir; a cached run that is not the committed one)."""
    cells = json.loads((results_root / benchmark / "results.json").read_text())["cells"]
    rows = []
    for cell in cells:
        overrides = cell["params"]["overrides"]
        cached = cache_root / cell["kind"] / f"{cell['fingerprint']}.json"
        work = cached.with_suffix(".work")
        last = final_checkpoint(work) if work.is_dir() and cached.is_file() else None
        if last is None:
            status = "not cached here"
        elif json.loads(cached.read_text())["seconds"] != cell["seconds"]:
            # the same cell rerun (another machine's cache, a --results-root trial): its
            # final model is not the one behind the committed numbers
            status, last = "cached from another run of the cell", None
        else:
            status = "scored"
        rows.append({"strategy": overrides["strategy"],
                     "clients": cell["params"].get("clients"), "seed": overrides["seed"],
                     "fingerprint": cell["fingerprint"], "status": status,
                     "checkpoint": last.name if last else None,
                     "final model return": _play(work, [last], episodes) if last else None})
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and number of devices: the final models' returns over seeds and how
    many reach the goal."""
    table = []
    for strategy, clients in dict.fromkeys((r["strategy"], r["clients"]) for r in rows):
        runs = [r for r in rows if (r["strategy"], r["clients"]) == (strategy, clients)]
        scored = [r["final model return"] for r in runs if r["final model return"] is not None]
        table.append({"strategy": strategy, "clients": clients,
                      "runs scored": f"{len(scored)}/{len(runs)}",
                      "final model return": spread(scored),
                      "per seed": ", ".join(f"{v:.1f}" for v in scored),
                      f">= {GOAL:g}": f"{sum(v >= GOAL for v in scored)}/{len(scored)}"})
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedq.simulations.final_model_replay",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", nargs="+", help="committed federation benchmarks")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--results-root", type=Path, default=RESULTS,
                        help="where the benchmarks' results are (bench's --results-root "
                        "of a trial run); the replay is written there too")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes: >= 1, got {args.episodes}")
    for benchmark in args.benchmarks:
        if not (args.results_root / benchmark / "results.json").is_file():
            parser.error(f"{benchmark}: no results.json in {args.results_root / benchmark}")
        rows = replay(benchmark, args.episodes, results_root=args.results_root)
        if not any(r["checkpoint"] for r in rows):
            parser.error(f"{benchmark}: none of the runs behind its committed results has "
                         f"its work dir in {CACHE_ROOT} (they are kept only on the machine "
                         "that ran them)")
        table = summary(rows)
        root = "" if args.results_root == RESULTS else f" --results-root {args.results_root}"
        command = ("python -m fedq.simulations.final_model_replay "
                   f"{benchmark} --episodes {args.episodes}{root}")
        out = args.results_root / benchmark
        atomic_write_text(out / "final_model_replay.json", json.dumps(
            {"command": command, "episodes": args.episodes, "goal": GOAL, "runs": rows,
             "summary": table}, indent=1) + "\n")
        text = (f"# {benchmark}: the final global model on {args.episodes} fresh greedy "
                f"episodes\n\nCommand: `{command}`\n\n{markdown_table(table, list(table[0]))}"
                "\n\nEach run's latest round checkpoint, replayed with best.pt's scoring "
                "seed (simulations/federated_cell.py); median [min, max] over seeds. Cell "
                "fingerprints in final_model_replay.json.\n")
        atomic_write_text(out / "final_model_replay.md", text)
        print(text)


if __name__ == "__main__":
    main()
