"""``fleetfl client start`` (join a coordinator) and ``fleetfl client probe`` (measure a device)."""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

from fleetfl.client.daemon import ClientSettings, prepare, run_supernode

WORKDIR_ROOT = Path.home() / ".local" / "share" / "fleetfl" / "clients"


def default_workdir(data: Path) -> Path:
    """One work directory per data file, so clients sharing a host keep apart their device
    profile, saved state and Flower cache: ``WORKDIR_ROOT/<stem>-<crc32 of the path>``."""
    path = data.expanduser().resolve()
    return WORKDIR_ROOT / f"{path.stem}-{zlib.crc32(str(path).encode()):08x}"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fleetfl client {start,probe}``."""
    client = subparsers.add_parser("client", help="run this machine as a fleetfl client",
                                   description="Join a coordinator as a Flower SuperNode.")
    sub = client.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    start = sub.add_parser(
        "start", help="connect to a coordinator and train when asked (runs until stopped)",
        description="Start a Flower SuperNode running fleetfl's ClientApp on local data. "
                    "It reconnects by itself when the coordinator restarts. See "
                    "docs/deploy.md for the data format and the keys.")
    start.add_argument("--coordinator", required=True, metavar="HOST:PORT",
                       help="the coordinator's address (what `fleetfl coordinator start` prints)")
    start.add_argument("--data", required=True, metavar="FILE.npz",
                       help="local training data: an .npz with arrays x and y")
    start.add_argument("--device", default="auto", metavar="PROFILE|FILE.json|auto",
                       help="device profile: a catalog name (e.g. rpi4), a JSON file, or "
                            "'auto' to measure this machine (default)")
    start.add_argument("--tls-ca", metavar="FILE", help="the coordinator's CA certificate (PEM)")
    start.add_argument("--insecure", action="store_true", help="plain HTTP, no TLS (tests only)")
    start.add_argument("--auth-key", metavar="FILE",
                       help="this client's private key (OpenSSH EC), registered at the "
                            "coordinator; from `fleetfl keys client`")
    start.add_argument("--index", type=int, metavar="N",
                       help="this client's index in the fleet (default: a hash of host and data)")
    start.add_argument("--workdir", metavar="DIR",
                       help=f"device profile, saved state and Flower's cache (default: one "
                            f"directory per data file under {WORKDIR_ROOT})")
    start.add_argument("--task", metavar="NAME",
                       help="the run's task.name (a built-in or module:attribute): check that "
                            "the data fits it before connecting (default: checked when the "
                            "coordinator first names the task)")
    start.add_argument("--task-params", default="{}", metavar="JSON",
                       help="the run's task.params, with --task")
    start.add_argument("--threads", type=int, default=1, metavar="N",
                       help="torch/BLAS threads for local training (default 1, as Flower's "
                            "apps; raise it on a device that runs one client per board)")
    start.add_argument("--poll", type=float, default=0.5, metavar="SECONDS",
                       help="how often an idle device asks the coordinator for work, in "
                            "(0, 3] (default 0.5; Flower's is 3)")
    start.add_argument("--runtime-port", type=int, default=0, metavar="PORT",
                       help="local port of the SuperNode's Runtime API (default: a free one)")
    start.add_argument("--retries", type=int, metavar="N",
                       help="give up after N failed connection attempts in a row, whatever "
                            "the reason (default: keep trying, e.g. while the coordinator "
                            "restarts)")
    start.add_argument("--runtime", choices=("torch", "executorch"), default="torch",
                       help="train in torch (default) or in ExecuTorch's training runtime, "
                            "as a phone does (needs pip install 'fleetfl[executorch]')")
    start.add_argument("--program", metavar="FILE.pte",
                       help="with --runtime executorch: the training program from `fleetfl "
                            "export --format executorch-train` (its FILE.pte.json beside it); "
                            "default: export the task's program when the device registers")
    probe = sub.add_parser("probe", help="measure this machine and print its device profile")
    probe.add_argument("--seconds", type=float, default=1.0, help="benchmark duration")
    return client


def check_auth_key(path: Path) -> None:
    """The key Flower's SuperNode will read: an OpenSSH EC private key (ValueError if not)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--auth-key {path}: not an unencrypted OpenSSH private key "
                         f"({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"--auth-key {path}: Flower needs an EC key (NIST curve), got "
                         f"{type(key).__name__}; make one with `fleetfl keys client`")


def settings_from_args(args: argparse.Namespace) -> ClientSettings:
    """Validate ``fleetfl client start`` options (ValueError names the problem)."""
    if args.insecure == bool(args.tls_ca):
        raise ValueError("give --tls-ca FILE (the coordinator's CA), or --insecure")
    if args.insecure and args.auth_key:
        raise ValueError("--auth-key needs TLS: Flower authenticates SuperNodes only over TLS")
    paths = {"--data": args.data, "--tls-ca": args.tls_ca, "--auth-key": args.auth_key}
    for flag, value in paths.items():
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"{flag} {value}: no such file")
    if args.auth_key:
        check_auth_key(Path(args.auth_key).expanduser())
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be at least 1")
    if not 0 < args.poll <= 3:
        raise ValueError(f"--poll {args.poll}: must be in (0, 3] seconds")
    if args.retries is not None and args.retries < 0:
        raise ValueError(f"--retries {args.retries}: must be 0 or more")
    _check_runtime(args.runtime, args.program)
    try:
        json.loads(args.task_params)
    except json.JSONDecodeError as err:
        raise ValueError(f"--task-params: not JSON ({err})") from None

    def path(value: str | None) -> Path | None:
        return Path(value).expanduser().resolve() if value else None

    data = Path(args.data).expanduser().resolve()
    workdir = Path(args.workdir).expanduser().resolve() if args.workdir else default_workdir(data)
    return ClientSettings(
        coordinator=args.coordinator, data=data, device=args.device, tls_ca=path(args.tls_ca),
        auth_key=path(args.auth_key), workdir=workdir, index=args.index,
        runtime_port=args.runtime_port, threads=args.threads, poll_s=args.poll,
        task=args.task, task_params=args.task_params, runtime=args.runtime,
        program=path(args.program))


def _check_runtime(runtime: str, program: str | None) -> None:
    """``--runtime executorch`` needs the pinned ExecuTorch; ``--program`` needs it and a
    manifest beside the file (ValueError naming the flag)."""
    if program is not None and runtime != "executorch":
        raise ValueError("--program is the ExecuTorch training program: add --runtime executorch")
    if runtime == "executorch":
        from fleetfl.client.executorch_api import ExecuTorchMissing, require

        try:
            require()
        except ExecuTorchMissing as err:
            raise ValueError(f"--runtime executorch: {err}") from None
    if program is not None:
        path = Path(program).expanduser()
        for file in (path, path.with_name(path.name + ".json")):
            if not file.is_file():
                raise ValueError(f"--program {program}: no such file {file}")


def main(argv: Sequence[str]) -> int:
    """``fleetfl client ...`` on its own: what a device runs, without the coordinator's imports
    (``fleetfl.coordinator.cli`` hands ``client`` commands here before building its parser)."""
    parser = argparse.ArgumentParser(prog="fleetfl")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Execute ``fleetfl client start|probe``."""
    if args.client_command == "probe":
        from fleetfl.devices.probe import probe

        print(json.dumps(probe(args.seconds).to_dict(), indent=2))
        return 0
    try:
        settings = settings_from_args(args)
        prepared = prepare(settings)
    except ValueError as err:  # DataFormatError is a ValueError
        print(f"fleetfl: error: {err}", file=sys.stderr)
        return 2
    print(f"fleetfl: {prepared.num_examples} examples from {settings.data}; device profile "
          f"{prepared.device_name!r} ({prepared.device_file}); connecting to "
          f"{settings.coordinator}", flush=True)
    return run_supernode(settings, prepared, retries=args.retries)
