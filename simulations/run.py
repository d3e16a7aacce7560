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
import math
import re
import shlex
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from fedq.common.config import (
    RESUME_CHANGEABLE_KEYS,
    ConfigError,
    ConfigScalar,
    FedqConfig,
    parse_assignment,
)
from fedq.common.envs import run_env_spec
from fedq.common.privacy_policy import PrivacyPolicy
from fedq.server.outcome import STATUS_FILE, read_status
from fedq.server.run_directory import RunDirectory, config_changes
from fedq.simulations.attacks import Attack, AttackError, attacker_app
from fedq.simulations.flower_runtime import RunResult, simulation_superlink, submit_run
from fedq.simulations.scenario import load_scenario

APP_DIR = Path(__file__).resolve().parent.parent
DEFAULT_CLIENTS = 4
RAY_START_ATTEMPTS = 3
_RAY_START_TIMEOUT = "The current node timed out during startup"
SIMULATION_FILE = "simulation.json"  # how fedq-simulate ran it (clients), for --resume
_TIMESTAMPED = re.compile(r"^\d\d/\d\d/\d{4} ")  # Flower's file-format copy of each line
# Flower's notes that do not apply to a fedq run: fedq always passes num-supernodes, and
# Ray's FutureWarning concerns its own environment variables, not anything a user sets.
_IRRELEVANT_NOTES = ("default simulated SuperNodes changed", "FutureWarning",
                     "Manually terminating ClientAppActor",
                     "warnings.warn(")


def progress_line(line: str) -> str | None:
    """What the terminal shows of one (colourless) line of the run's log: fedq's progress,
    warnings and errors, as plain text without Flower's ``INFO :`` prefix; None for the
    rest, which goes only to ``flower.log``. Flower streams every line twice (console and
    file format) plus DEBUG, and notes that do not apply to fedq's runs."""
    if _TIMESTAMPED.match(line) or any(note in line for note in _IRRELEVANT_NOTES):
        return None
    if "[fedq]" in line:
        return line[line.index("[fedq]"):]
    return None if line.startswith(("INFO", "DEBUG")) else line


def app_defaults(app_dir: Path = APP_DIR) -> dict[str, ConfigScalar]:
    """The ``[tool.flwr.app.config]`` table: what ``flwr run`` starts from."""
    with open(app_dir / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def resolve_run_config(overrides: dict[str, ConfigScalar], clients: int,
                       app_dir: Path = APP_DIR) -> tuple[FedqConfig, dict[str, ConfigScalar]]:
    """Validate everything a run needs before any process starts.

    Returns the parsed config and the run config to submit: the overrides plus an absolute
    ``run-dir``. Raises :class:`ConfigError` naming the first bad field. A resumed run
    starts from the config it was started with (its ``config.json``), not from today's
    defaults, and refuses overrides that would change the experiment.
    """
    if clients < 1:
        raise ConfigError("clients", f"must be >= 1, got {clients}")
    base = app_defaults(app_dir)
    if overrides.get("resume"):
        saved = _saved_config(Path(str(overrides["run-dir"])).expanduser().resolve())
        config = FedqConfig.from_mapping({**base, **saved, **overrides})
        if changed := config_changes(saved, config.to_mapping()):
            key, change = next(iter(changed.items()))
            raise ConfigError(key, f"{change}: a resumed run keeps its config (only "
                              + ", ".join(sorted(RESUME_CHANGEABLE_KEYS)) + " may change)")
        overrides = {**saved, **overrides}
        base = saved
    config = FedqConfig.from_mapping({**base, **overrides})
    PrivacyPolicy.from_mapping(overrides)  # privacy-* keys that tighten every device's policy
    # unknown id / wrong spaces / bad physics fail here
    run_env_spec(config)
    if config.min_available_clients > clients:
        raise ConfigError("min-available-clients",
                          f"{config.min_available_clients} exceeds the {clients} simulated "
                          "clients; the first round would wait forever")
    run_dir = Path(config.run_dir).expanduser().resolve()
    if not config.resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError("run-dir", f"'{run_dir}' already holds a run; pass --resume "
                          "to continue it or choose another --run-dir")
    absolute: dict[str, ConfigScalar] = {"run-dir": str(run_dir)}
    if config.initial_weights:  # read by the ServerApp, whose working directory is not ours
        weights = Path(config.initial_weights).expanduser().resolve()
        if not config.resume and not weights.is_file():
            raise ConfigError("initial-weights", f"no checkpoint file '{weights}'")
        absolute["initial-weights"] = str(weights)
    return config, {**overrides, **absolute}


def _saved_config(run_dir: Path) -> dict[str, ConfigScalar]:
    """The config a run in ``run_dir`` was started with."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("run-dir", f"nothing to resume: '{path}' does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError("run-dir", f"cannot resume: '{path}' is unreadable ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError("run-dir", f"cannot resume: '{path}' does not hold a config object")
    return saved


def requested_attack(args: argparse.Namespace) -> Attack | None:
    """The ``--attack`` options as an :class:`Attack` (None without ``--attack``)."""
    if args.attack is None:
        if args.attack_partitions:
            raise AttackError("partitions", "--attack-partitions needs --attack")
        return None
    return Attack.parse(args.attack, args.attack_partitions, args.attack_scale)


def simulation_attack(run_dir: Path, requested: Attack | None) -> Attack | None:
    """On resume, the attack the run was started with (``simulation.json``); a resume
    that asks for another one would be another experiment and is refused."""
    path = run_dir / SIMULATION_FILE
    saved_json = json.loads(path.read_text()).get("attack") if path.exists() else None
    saved = None if saved_json is None else Attack.from_json(saved_json)
    if requested is not None and requested != saved:
        raise AttackError("kind", f"the run in '{run_dir}' was started with attack {saved}; "
                          "a resume cannot change it")
    return saved


def simulation_clients(run_dir: Path, requested: int | None) -> int:
    """How many virtual devices a run has: what ``--clients`` asks for, or on resume what
    the run was started with (kept in ``simulation.json``); a resume with another number
    would be another experiment and is refused."""
    path = run_dir / SIMULATION_FILE
    if not path.exists():
        return DEFAULT_CLIENTS if requested is None else requested
    saved = int(json.loads(path.read_text())["clients"])
    if requested is not None and requested != saved:
        raise ConfigError("clients", f"the run in '{run_dir}' was started with {saved} "
                          f"clients, not {requested}; a resume cannot change it")
    return saved


def simulate(run_config: dict[str, ConfigScalar], clients: int, *, cpus_per_client: int = 1,
             timeout: float = 24 * 3600.0, stream: bool = True,
             app_dir: Path = APP_DIR, attack: Attack | None = None) -> RunResult:
    """Submit the app to a private simulation SuperLink and wait for the run to end;
    with an ``attack``, the app whose ClientApp has simulated attackers
    (:mod:`simulations.attacks`)."""
    run_dir = Path(str(run_config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedq-sim-") as workdir, \
            simulation_superlink(Path(workdir)) as link:
        app = app_dir if attack is None else attacker_app(app_dir, Path(workdir), attack)
        return submit_run(
            link, app, run_config=run_config, num_supernodes=clients,
            federation_config={"client-resources-num-cpus": cpus_per_client},
            stream=stream, timeout=timeout, log_path=run_dir / "flower.log",
            echo=progress_line)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedq-simulate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys and defaults: see docs/configuration.md or "
               "[tool.flwr.app.config] in pyproject.toml.")
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
    parser.add_argument("--attack", choices=["nan", "noise"],
                        help="benchmarks only: devices in --attack-partitions send all-NaN "
                             "weights or the global weights + N(0, --attack-scale^2) "
                             "(simulations/attacks.py)")
    parser.add_argument("--attack-partitions", default="",
                        help="comma-separated partition ids that attack")
    parser.add_argument("--attack-scale", type=float, default=10.0,
                        help="noise std of --attack noise (default 10)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``), raised where the run waits so that it ends the way Ctrl-C
    does: Flower's processes torn down and the resume command printed. Python's default
    SIGTERM action ends the process at once, leaving the sweep to the watchdog and the user
    without the command that resumes the run."""

    signum = signal.SIGTERM


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    try:
        overrides = dict(parse_assignment(item) for item in args.overrides)
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        if args.resume:
            overrides["resume"] = True
            if args.run_dir is None and "run-dir" not in overrides:
                raise ConfigError("run-dir", "--resume needs the --run-dir of the run")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        overrides["run-dir"] = args.run_dir or overrides.get("run-dir", f"runs/sim-{stamp}")
        run_dir = Path(str(overrides["run-dir"])).expanduser().resolve()
        clients = simulation_clients(run_dir, args.clients) if args.resume else (
            DEFAULT_CLIENTS if args.clients is None else args.clients)
        attack = requested_attack(args)
        if args.resume:
            attack = simulation_attack(run_dir, attack)
        if args.scenario is not None:
            scenario = load_scenario(args.scenario, args.clients, app_defaults(), overrides)
            overrides = {**scenario.run_config(), **overrides}
            clients = scenario.num_clients
        config, run_config = resolve_run_config(overrides, clients)
    except (ConfigError, AttackError) as err:
        print(f"fedq-simulate: {err}", file=sys.stderr)
        return 2
    done = RunDirectory(run_dir).latest_round() if config.resume else 0
    what = (f"{clients} clients x {config.local_steps} local steps on {config.env_id}, "
            f"strategy {config.strategy}")
    if config.resume:
        print(f"[fedq] resuming run {run_dir} at round {done + 1} of "
              f"{config.num_server_rounds}: {what}", flush=True)
    else:
        print(f"[fedq] {config.num_server_rounds} rounds x {what}; results in {run_dir}",
              flush=True)
    print(f"[fedq] watch it live: tensorboard --logdir {run_dir / 'tensorboard'}  "
          "(pip install tensorboard)", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SIMULATION_FILE).write_text(json.dumps(
        {"clients": clients, "attack": None if attack is None else attack.to_json()}) + "\n")
    submitted = time.time()
    # from here on a signal stops a run (fedq-simulate's entry point answered it until now;
    # a background job's ignored SIGINT stays ignored)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            result = simulate(run_config, clients, cpus_per_client=args.cpus_per_client,
                              timeout=args.timeout, stream=not args.quiet, attack=attack)
            if result.ok or not ray_start_failed(result.output):
                break
            print(f"[fedq] Ray did not start within its fixed 30 s (attempt {attempt} of "
                  f"{RAY_START_ATTEMPTS}): the machine is too busy for it right now.",
                  file=sys.stderr, flush=True)
            if RunDirectory(run_dir).read_metrics() or attempt == RAY_START_ATTEMPTS:
                break  # a round already ran (or no attempts left): no blind retry
    except KeyboardInterrupt as stop:
        saved = RunDirectory(run_dir).latest_round()
        kept = f"Rounds 1-{saved} are saved" if saved else "No round had finished yet"
        print(f"\nfedq-simulate: interrupted; every Flower process it started is stopped. "
              f"{kept} in {run_dir}. Resume with:\n"
              f"  fedq-simulate --run-dir {shlex.quote(str(run_dir))} --resume",
              file=sys.stderr)
        return 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)
    if not result.ok and ray_start_failed(result.output):
        print("fedq-simulate: Ray, which hosts the simulated devices, did not start in time "
              "on this busy machine. Stop other heavy programs or use fewer --clients, then "
              f"run the same command again (resume a started run with --run-dir {run_dir} "
              f"--resume). Flower log: {run_dir / 'flower.log'}", file=sys.stderr)
        return 1
    status = read_status(run_dir)
    if status is not None and (run_dir / STATUS_FILE).stat().st_mtime < submitted:
        status = None  # an earlier run's
    if not result.ok:
        print(f"fedq-simulate: run {result.run_id} ended {result.status} "
              f"({result.status_details or 'no details'}); Flower log: "
              f"{run_dir / 'flower.log'}", file=sys.stderr)
        if status is not None:
            print(f"fedq-simulate: {status.get('line')}", file=sys.stderr)
        return 1
    print(run_summary(run_dir, config, time.monotonic() - started))
    if status is not None and status.get("status") != "ok":
        print(f"fedq-simulate: {status.get('line')}; per-device errors in "
              f"{run_dir / 'metrics.jsonl'} (device-failures)", file=sys.stderr)
    return 0


def ray_start_failed(output: str) -> bool:
    """Whether a run failed because Ray's node did not start within the 30 s that Ray
    hard-codes (ray/_private/node.py), which happens on a loaded machine. Nothing of the
    run has happened then, so starting it again is safe."""
    return _RAY_START_TIMEOUT in output


def run_summary(run_dir: Path, config: FedqConfig, seconds: float) -> str:
    """The end-of-run table: returns (final, best), privacy spent, time and the files."""
    rows = RunDirectory(run_dir).read_metrics()
    returns = [(r["round"], r["eval"]["eval-return-mean"]) for r in rows
               if "eval-return-mean" in r.get("eval", {})]
    epsilons = [r["train"]["dp-epsilon-max"] for r in rows if "dp-epsilon-max" in r["train"]]
    lines = [("rounds", f"{len(rows)} of {config.num_server_rounds}")]
    if returns:
        best_round, best = max(returns, key=lambda item: item[1])
        lines += [("final greedy return", f"{returns[-1][1]:.1f} (round {returns[-1][0]})"),
                  ("best greedy return", f"{best:.1f} (round {best_round})")]
    if math.isfinite(config.target_return):
        reached = next((r for r, value in returns if value >= config.target_return), None)
        lines.append(("target return", f"{config.target_return:g}: " + (
            f"first reached in round {reached}" if reached else "not reached")))
    lines.append(("privacy spent", f"epsilon {max(epsilons):.3g} at delta {config.dp_delta:g} "
                  "(worst device)" if epsilons else "no DP (epsilon = inf)"))
    lines.append(("wall time", f"{seconds:.0f} s"))
    lines += [(name, str(run_dir / name)) for name in
              ("metrics.jsonl", "learning_curve.png", "checkpoints", "tensorboard", "flower.log")
              if (run_dir / name).exists()]
    width = max(len(key) for key, _ in lines)
    return "\n".join(["[fedq] run summary"] + [f"  {key:<{width}}  {value}"
                                               for key, value in lines])


if __name__ == "__main__":
    sys.exit(main())
