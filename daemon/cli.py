"""The `i2vd` command. It parses arguments, calls the service or a stage, and maps errors to exit codes.

Exit codes (sysexits.h where one fits): 0 ok; 1 runtime failure; 2 usage; 65 (EX_DATAERR) invalid sidecar or
image; 78 (EX_CONFIG) invalid configuration — the systemd unit does not restart on 78, since retrying cannot help.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from daemon import __version__
from daemon.config import DaemonConfig, load_config
from daemon.errors import ConfigError, FatalError, JobRejected, StartAbandoned

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_DATAERR = 65
EXIT_CONFIG = 78


def _load(args: argparse.Namespace) -> DaemonConfig:
    path = args.config or os.environ.get("I2VD_CONFIG")
    overrides = {"inbox": getattr(args, "inbox", None), "outbox": getattr(args, "outbox", None)}
    return load_config(Path(path) if path else None, overrides)


def command_run(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging
    from daemon.service import Service
    from daemon.signals import StopSignals

    config = _load(args)
    if args.executor is not None:
        config = config.model_copy(update={"executor": config.executor.model_copy(update={"kind": args.executor})})
    configure_logging(config.logging.level, config.logging.format)
    signals = StopSignals()
    signals.install()
    # The service polls the signal flags: a signal while the model loads (minutes on a first compile) gives the
    # start up at once; once running, a first signal stops gracefully and a second stops waiting for the job.
    service = Service(config, once=args.once, stop_requested=signals.stop_requested, force=signals.force_requested)
    try:
        service.start()
    except StartAbandoned:
        # The model was still loading: its thread (and the library threads under it) would keep the interpreter
        # from exiting until the load ends. Nothing is lost: claimed jobs are recovered at the next start, and
        # the generation processes exit when they see their parent gone.
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_OK)
    return service.run_until_stopped()


def command_validate(args: argparse.Namespace) -> int:
    """Print the resolved job as JSON; never loads the model."""
    from daemon.intake import load_image_rgb
    from daemon.jobspec import parse_sidecar, resolve_job

    config = _load(args)
    sidecar = Path(args.sidecar)
    try:
        spec = parse_sidecar(sidecar.read_bytes())
        image_size = None
        if args.image:
            with load_image_rgb(Path(args.image), config.intake.max_image_pixels) as image:
                image_size = image.size
        resolved = resolve_job(
            spec,
            config.generation,
            config.encode,
            stem=sidecar.stem,
            image_size=image_size,
            decode_chunk=config.model.decode_chunk_size,
        )
    except JobRejected as exc:
        print(json.dumps({"valid": False, "reason": exc.reason, "message": exc.message, "detail": exc.detail}))
        print(f"invalid: {exc.message}", file=sys.stderr)
        return EXIT_DATAERR
    except OSError as exc:
        print(f"cannot read input: {exc}", file=sys.stderr)
        return EXIT_DATAERR
    plan: dict[str, Any] = {"valid": True, **resolved.model_dump(mode="json")}
    plan["seed_source"] = "sidecar" if spec.seed is not None else "random (chosen at claim time)"
    plan["estimated_vram_gib"] = round(resolved.estimated_vram_bytes / 2**30, 2)
    mode = resolved.mode or config.model.mode
    plan["estimated_gpu_seconds"] = round(_estimated_seconds(config.generation.backend, resolved, mode), 1)
    plan["estimates_measured_on"] = _measured_on(config.generation.backend)
    plan["duration_seconds"] = resolved.duration_seconds
    print(json.dumps(plan, indent=2))
    return EXIT_OK


def _estimated_seconds(backend: str, resolved: Any, mode: str) -> float:
    """Seconds on the GPU the backend's VRAM/time model was measured on (BENCHMARKS.md: GPU, Other backends)."""
    from daemon.generate.estimates import job_seconds

    return job_seconds(backend, resolved.width, resolved.height, resolved.num_frames, resolved.steps, mode)


def _measured_on(backend: str) -> str:
    from daemon.generate.estimates import measured_on

    return measured_on(backend)


def _sidecar_bytes(args: argparse.Namespace, config: DaemonConfig) -> bytes:
    from daemon.jobspec import parse_sidecar, resolve_job

    data = Path(args.sidecar).read_bytes() if args.sidecar else yaml.safe_dump({"prompt": args.prompt}).encode()
    # Refuse to drop what the daemon would reject, including what the configured model cannot do (modelrules.py).
    resolve_job(parse_sidecar(data), config.generation, config.encode, stem="submit")
    return data


def _drop_atomically(data_source: Path | bytes, destination: Path) -> None:
    """Write under a `.part` name the daemon ignores, then rename: the daemon never sees a half file."""
    partial = destination.with_name(f"{destination.name}.{uuid.uuid4().hex[:8]}.part")
    if isinstance(data_source, Path):
        shutil.copyfile(data_source, partial)
    else:
        partial.write_bytes(data_source)
    with partial.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.rename(partial, destination)


def command_submit(args: argparse.Namespace) -> int:
    """Drop a pair into the inbox: image first, sidecar last (the daemon waits for both)."""
    from daemon.intake import IMAGE_EXTENSIONS
    from daemon.jobspec import output_name_for_stem

    config = _load(args)
    image = Path(args.image)
    suffix = image.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        print(f"{image}: extension must be one of {sorted(IMAGE_EXTENSIONS)}", file=sys.stderr)
        return EXIT_DATAERR
    if not image.is_file():
        print(f"{image}: no such image file", file=sys.stderr)
        return EXIT_DATAERR
    try:
        sidecar = _sidecar_bytes(args, config)
    except JobRejected as exc:
        print(f"invalid sidecar: {exc.message}", file=sys.stderr)
        return EXIT_DATAERR
    except OSError as exc:
        print(f"{args.sidecar}: cannot read the sidecar: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_DATAERR
    inbox = config.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    stem = output_name_for_stem(args.name or image.stem)  # never fails: `image` when nothing usable is left
    while any((inbox / f"{stem}{ext}").exists() for ext in (suffix, ".yaml")):
        stem = f"{stem}-{uuid.uuid4().hex[:6]}"
    _drop_atomically(image, inbox / f"{stem}{suffix}")
    _drop_atomically(sidecar, inbox / f"{stem}.yaml")
    print(
        json.dumps(
            {
                "submitted": stem,
                "image": str(inbox / f"{stem}{suffix}"),
                "sidecar": str(inbox / f"{stem}.yaml"),
            }
        )
    )
    return EXIT_OK


def command_status(args: argparse.Namespace) -> int:
    from daemon.status import collect_status, format_status

    config = _load(args)
    report = collect_status(config)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


def command_pause(args: argparse.Namespace) -> int:
    """Hold the queue: the running job finishes, no new one starts; survives a restart (a flag file)."""
    from daemon.control import pause

    config = _load(args)
    changed = pause(config.state_path)
    print(json.dumps({"paused": True, "changed": changed}))
    return EXIT_OK


def command_resume(args: argparse.Namespace) -> int:
    from daemon.control import resume

    config = _load(args)
    changed = resume(config.state_path)
    print(json.dumps({"paused": False, "changed": changed}))
    return EXIT_OK


def command_retry(args: argparse.Namespace) -> int:
    """Move a failed pair from `inbox/failed/NAME/` back into the inbox under its original names."""
    from daemon.control import ControlError, retry_failed

    config = _load(args)
    try:
        image, sidecar = retry_failed(config.inbox, args.name)
    except ControlError as exc:
        print(f"retry: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps({"retried": args.name, "image": str(image), "sidecar": str(sidecar)}))
    return EXIT_OK


def command_cancel(args: argparse.Namespace) -> int:
    """Ask the daemon to cancel the pending or running job NAME (applied within a second, or at its next start)."""
    from daemon.control import claimed_names, request_cancel

    config = _load(args)
    if args.name not in claimed_names(config.state_path):
        print(f"cancel: no pending or running job named {args.name!r}", file=sys.stderr)
        return EXIT_FAILURE
    request = request_cancel(config.state_path, args.name)
    print(json.dumps({"cancel_requested": args.name, "request": str(request)}))
    return EXIT_OK


def command_check_config(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file))
    from daemon.encode import Encoder

    Encoder(config.encode)  # `encode.ffmpeg` must be runnable: found now, not after the model has loaded
    print(json.dumps(config.model_dump(mode="json"), indent=2) if args.show else f"{args.file}: OK")
    return EXIT_OK


def _add_control_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """`pause`, `resume`, `retry NAME`, `cancel NAME`: operator control through files in the state directory."""
    for name, handler, text in (
        ("pause", command_pause, "finish the running job, then hold the queue (survives restarts)"),
        ("resume", command_resume, "take jobs from the queue again"),
    ):
        with_config(commands.add_parser(name, help=text)).set_defaults(handler=handler)
    for name, handler, text in (
        ("retry", command_retry, "move inbox/failed/NAME back into the inbox"),
        ("cancel", command_cancel, "cancel the pending or running job NAME (it moves to inbox/failed/)"),
    ):
        sub = with_config(commands.add_parser(name, help=text))
        sub.add_argument("name", help="the job's name: its inbox file name without extension")
        sub.set_defaults(handler=handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i2vd", description="Image-to-video hot-folder daemon (I2VGen-XL).")
    parser.add_argument("--version", action="version", version=f"i2vd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", help="YAML config file (default: $I2VD_CONFIG, else built-in defaults)")
        return sub

    run = with_config(commands.add_parser("run", help="watch the inbox and generate videos"))
    run.add_argument("--inbox")
    run.add_argument("--outbox")
    run.add_argument("--once", action="store_true", help="process what is in the inbox, then exit 0")
    run.add_argument(
        "--executor", choices=("local", "ray"), help="where generation runs (default: executor.kind of the config)"
    )
    run.set_defaults(handler=command_run)

    validate = with_config(commands.add_parser("validate", help="check a sidecar (and image); print the plan"))
    validate.add_argument("sidecar")
    validate.add_argument("image", nargs="?")
    validate.set_defaults(handler=command_validate)

    submit = with_config(commands.add_parser("submit", help="drop an image + sidecar into the inbox atomically"))
    submit.add_argument("image")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--sidecar")
    submit.add_argument("--name", help="job name (default: the image's stem)")
    submit.add_argument("--inbox")
    submit.set_defaults(handler=command_submit)

    status = with_config(commands.add_parser("status", help="queue, running job, recent outcomes"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=command_status)

    _add_control_commands(commands, with_config)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.add_argument("--show", action="store_true", help="print the resolved configuration")
    check.set_defaults(handler=command_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        return EXIT_CONFIG
    except FatalError as exc:
        print(f"fatal: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    return code
