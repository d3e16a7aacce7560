"""``fedq-simulate``: a federated DQN run of N virtual devices in Flower's simulation engine.

This is what ``flwr run .`` does, made safe to script: the config is validated here first
(so a typo fails in a second, not after Ray has started), the run directory is made
absolute (Flower's processes do not share our working directory), and a private
SuperLink is started and always torn down, whatever happens to the run.

Example::

    fedq-simulate --clients 4 --set num-server-rounds=12 --set local-steps=4000
    fedq-simulate --scenario simulations/scenarios/hetero_cartpole.toml
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, ConfigScalar, FedqConfig, parse_assignment
from common.envs import env_spec
from common.flower_runtime import RunResult, simulation_superlink, submit_run
from server.outcome import STATUS_FILE, read_status
from simulations.scenario import load_scenario

APP_DIR = Path(__file__).resolve().parent.parent
_TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} ")  # Flower's file-format copy of each line


def progress_only(line: str) -> bool:
    """Keep fedq's progress, warnings and errors on the terminal; the full log goes to
    ``flower.log``. Flower streams every line twice (console and file format) plus DEBUG."""
    if _TIMESTAMPED.match(line):
        return False
    return not line.startswith(("INFO", "DEBUG")) or "[fedq]" in line


def app_defaults(app_dir: Path = APP_DIR) -> dict[str, ConfigScalar]:
    """The ``[tool.flwr.app.config]`` table: what ``flwr run`` starts from."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def resolve_run_config(overrides: dict[str, ConfigScalar], clients: int,
                       app_dir: Path = APP_DIR) -> tuple[FedqConfig, dict[str, ConfigScalar]]:
    """Validate everything a run needs before any process starts.

    Returns the parsed config and the run config to submit: the overrides plus an absolute
    ``run-dir``. Raises :class:`ConfigError` naming the first bad field.
    """
    if clients < 1:
        raise ConfigError("clients", f"must be >= 1, got {clients}")
    config = FedqConfig.from_mapping({**app_defaults(app_dir), **overrides})
    # unknown id / wrong spaces / bad physics fail here
    env_spec(config.env_id, config.env_kwargs, config.env_physics)
    if config.min_available_clients > clients:
        raise ConfigError("min-available-clients",
                          f"{config.min_available_clients} exceeds the {clients} simulated "
                          "clients; the first round would wait forever")
    run_dir = Path(config.run_dir).expanduser().resolve()
    if not config.resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError("run-dir", f"'{run_dir}' already holds a run; pass --resume "
                          "to continue it or choose another --run-dir")
    return config, {**overrides, "run-dir": str(run_dir)}


def simulate(run_config: dict[str, ConfigScalar], clients: int, *, cpus_per_client: int = 1,
             timeout: float = 24 * 3600.0, stream: bool = True,
             app_dir: Path = APP_DIR) -> RunResult:
    """Submit the app to a private simulation SuperLink and wait for the run to end."""
    run_dir = Path(str(run_config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedq-sim-") as workdir, \
            simulation_superlink(Path(workdir)) as link:
        return submit_run(
            link, app_dir, run_config=run_config, num_supernodes=clients,
            federation_config={"client-resources-num-cpus": cpus_per_client},
            stream=stream, timeout=timeout, log_path=run_dir / "flower.log",
            echo_filter=progress_only)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq-simulate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys and defaults: see README.md or [tool.flwr.app.config] in "
               "pyproject.toml.")
    parser.add_argument("--clients", type=int,
                        help="virtual devices (default 4, or the scenario's num-clients)")
    parser.add_argument("--scenario", type=Path,
                        help="a federation declared in TOML (simulations/scenarios/); "
                             "--set overrides its [run] table")
    parser.add_argument("--rounds", type=int, help="shortcut for --set num-server-rounds=N")
    parser.add_argument("--run-dir", help="results directory (default runs/sim-<timestamp>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir after its last checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="CPU cores reserved per virtual device; sets how many train at "
                             "once (default 1)")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0,
                        help="seconds before the run is stopped (default 1 day)")
    parser.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = dict(parse_assignment(item) for item in args.overrides)
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        if args.resume:
            overrides["resume"] = True
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        overrides["run-dir"] = args.run_dir or overrides.get("run-dir", f"runs/sim-{stamp}")
        clients = 4 if args.clients is None else args.clients
        if args.scenario is not None:
            scenario = load_scenario(args.scenario, args.clients, app_defaults(), overrides)
            overrides = {**scenario.run_config(), **overrides}
            clients = scenario.num_clients
        config, run_config = resolve_run_config(overrides, clients)
    except ConfigError as err:
        print(f"fedq-simulate: {err}", file=sys.stderr)
        return 2
    run_dir = Path(str(run_config["run-dir"]))
    print(f"[fedq] {clients} clients x {config.num_server_rounds} rounds x "
          f"{config.local_steps} local steps on {config.env_id}; results in {run_dir}",
          flush=True)
    started = time.time()
    result = simulate(run_config, clients, cpus_per_client=args.cpus_per_client,
                      timeout=args.timeout, stream=not args.quiet)
    status = read_status(run_dir)
    if status is not None and (run_dir / STATUS_FILE).stat().st_mtime < started:
        status = None  # an earlier run's
    if not result.ok:
        print(f"fedq-simulate: run {result.run_id} ended {result.status} "
              f"({result.status_details or 'no details'}); Flower log: "
              f"{run_dir / 'flower.log'}", file=sys.stderr)
        if status is not None:
            print(f"fedq-simulate: {status.get('line')}", file=sys.stderr)
        return 1
    _print_summary(run_dir)
    if status is not None and status.get("status") != "ok":
        print(f"fedq-simulate: {status.get('line')}; per-device errors in "
              f"{run_dir / 'metrics.jsonl'} (device-failures)", file=sys.stderr)
    return 0


def _print_summary(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["eval"] if rows else {}
    print(f"[fedq] done: {len(rows)} rounds, final greedy return "
          f"{last.get('eval-return-mean', float('nan')):.1f} (mean over clients)")
    for name in ("metrics.jsonl", "learning_curve.png", "checkpoints", "devices"):
        print(f"[fedq]   {run_dir / name}")


if __name__ == "__main__":
    sys.exit(main())
