"""The ``gateway`` command: run, check, plugins, new, reload.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import InstanceConfig, ProcessSettings, load_instances, load_process_settings
from gateway.config.instance import INSTANCE_NAME
from gateway.errors import ConfigError, ConfigProblem, PluginError
from gateway.logs import setup_logging
from gateway.ops import start_ops
from gateway.plugins import AGENTS, DRIVERS, PluginRegistry
from gateway.reloading import AlreadyRunning, PidFile, Reloader, running_pid
from gateway.runtime import Gateway
from gateway.scaffold import render_instance

__all__ = ["main"]

log = logging.getLogger("gateway")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"gateway: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except PluginError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("gateway failed")
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    # The logging options are accepted before and after the command (`gateway run --log-level debug`);
    # SUPPRESS keeps a subcommand's absent option from overwriting one given before it.
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS
    )
    logging_options.add_argument(
        "--log-format", choices=["text", "json"], default=argparse.SUPPRESS
    )
    parser = argparse.ArgumentParser(
        prog="gateway", description="Connect IM robots to AI agents.", parents=[logging_options]
    )
    sub = parser.add_subparsers(dest="command")

    def add_paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("--instances", type=Path, default=Path("instances"), help="instances folder")
        p.add_argument(
            "--config", type=Path, default=None, help="process settings (default ./gateway.toml)"
        )

    run = sub.add_parser(
        "run", parents=[logging_options], help="run every enabled instance until stopped"
    )
    add_paths(run)
    http = run.add_mutually_exclusive_group()
    http.add_argument(
        "--http", metavar="HOST:PORT", help="operations endpoint address (overrides gateway.toml)"
    )
    http.add_argument("--no-http", action="store_true", help="do not start the operations endpoint")
    run.set_defaults(handler=_run)

    status = sub.add_parser(
        "status", parents=[logging_options], help="show the instances of a running gateway"
    )
    status.add_argument(
        "url", nargs="?", default=None, help="its operations endpoint (default: from gateway.toml)"
    )
    status.add_argument(
        "--config", type=Path, default=None, help="process settings (default ./gateway.toml)"
    )
    status.set_defaults(handler=_status)

    send = sub.add_parser(
        "send",
        parents=[logging_options],
        help="send a message through an instance of a running gateway (the outbound API)",
    )
    send.add_argument("instance", help="the instance to send through")
    send.add_argument("text", help="the message text ('-': read it from standard input)")
    send.add_argument("--to", required=True, help="conversation id (or user id with --user)")
    send.add_argument("--user", action="store_true", help="--to is a user, not a conversation")
    send.add_argument("--markdown", action="store_true", help="send the text as markdown")
    send.add_argument("--title", default="", help="title, where the platform shows one")
    send.add_argument(
        "--key", default="", help="idempotency key: a retry with it sends nothing twice"
    )
    send.add_argument(
        "--url", default=None, help="its operations endpoint (default: from gateway.toml)"
    )
    send.add_argument(
        "--config", type=Path, default=None, help="process settings (default ./gateway.toml)"
    )
    send.set_defaults(handler=_send)

    check = sub.add_parser(
        "check", parents=[logging_options], help="validate every config file; connect nothing"
    )
    add_paths(check)
    check.set_defaults(handler=_check)

    plugins = sub.add_parser(
        "plugins", parents=[logging_options], help="list the drivers and agents found"
    )
    plugins.set_defaults(handler=_plugins)

    new = sub.add_parser(
        "new", parents=[logging_options], help="write a commented instance file for a driver type"
    )
    new.add_argument("type", help="driver type (see `gateway plugins`)")
    new.add_argument("name", help="instance name (the file name without extension)")
    new.add_argument("--agent", default="echo", help="agent type (default: echo)")
    new.add_argument("--instances", type=Path, default=Path("instances"), help="instances folder")
    new.add_argument("--force", action="store_true", help="overwrite an existing file")
    new.set_defaults(handler=_new)

    reload = sub.add_parser(
        "reload",
        parents=[logging_options],
        help="make the running gateway re-read its instances folder (SIGHUP)",
    )
    reload.add_argument(
        "--config", type=Path, default=None, help="process settings (default ./gateway.toml)"
    )
    reload.set_defaults(handler=_reload)
    return parser


def _process_settings(args: argparse.Namespace) -> ProcessSettings:
    path = args.config or Path("gateway.toml")
    return load_process_settings(path, required=args.config is not None)


def _setup_logging(args: argparse.Namespace, process: ProcessSettings | None = None) -> None:
    level = getattr(args, "log_level", None) or (process.log.level if process else "info")
    fmt = getattr(args, "log_format", None) or (process.log.format if process else "text")
    setup_logging(level, fmt)


def _load(args: argparse.Namespace) -> tuple[ProcessSettings, list[InstanceConfig], PluginRegistry]:
    problems: list[ConfigProblem] = []
    process = None
    try:
        process = _process_settings(args)
    except ConfigError as exc:
        problems.extend(exc.problems)
    registry = PluginRegistry.discover()
    try:
        configs = load_instances(args.instances, registry)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    assert process is not None
    return process, configs, registry


def _warn_broken_plugins(registry: PluginRegistry) -> None:
    for group in (DRIVERS, AGENTS):
        for plugin in registry.all(group):
            if plugin.error:
                log.warning(
                    "plugin %s (%s %s) failed to load: %s",
                    plugin.name,
                    plugin.distribution,
                    plugin.version,
                    plugin.error,
                )


def _check(args: argparse.Namespace) -> int:
    _setup_logging(args)
    _, configs, registry = _load(args)
    _warn_broken_plugins(registry)
    for config in configs:
        state = "enabled" if config.enabled else "disabled"
        print(f"{config.name}: {config.driver_type} driver, {config.agent_type} agent ({state})")
    print(f"configuration OK: {len(configs)} instance(s) in {args.instances}")
    return EXIT_OK


def _plugins(args: argparse.Namespace) -> int:
    _setup_logging(args)
    registry = PluginRegistry.discover()
    for group, heading in ((DRIVERS, "Drivers"), (AGENTS, "Agents")):
        print(f"{heading} ({group}):")
        plugins = registry.all(group)
        if not plugins:
            print("  (none installed)")
        for plugin in plugins:
            origin = f"{plugin.distribution} {plugin.version}"
            if plugin.error:
                print(f"  {plugin.name:<18} {origin:<24} FAILED TO LOAD: {plugin.error}")
            else:
                print(f"  {plugin.name:<18} {origin:<24} {plugin.title}: {plugin.description}")
    return EXIT_OK


def _new(args: argparse.Namespace) -> int:
    _setup_logging(args)
    registry = PluginRegistry.discover()
    driver_class = registry.driver(args.type)
    agent_class = registry.agent(args.agent)
    # The same rule as `check` and `run`: a name they reject (or a path like "../x") is refused here.
    if not INSTANCE_NAME.fullmatch(args.name):
        print(
            f"gateway: instance name {args.name!r} must be letters, digits, '_', '.' or '-'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    path = args.instances / f"{args.name}.toml"
    if path.exists() and not args.force:
        print(f"gateway: {path} exists (use --force to overwrite)", file=sys.stderr)
        return EXIT_CONFIG
    other = path.with_suffix(".json")
    if other.exists():
        # Two files for one instance name: `check` and `run` would reject the folder.
        print(f"gateway: {other} already defines instance {args.name!r}", file=sys.stderr)
        return EXIT_CONFIG
    text = render_instance(
        name=args.name,
        driver_type=args.type,
        driver_class=driver_class,
        agent_type=args.agent,
        agent_class=agent_class,
    )
    args.instances.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import aiohttp

    from gateway.ops import check_url, fetch_instances, format_status, local_url

    try:
        url = check_url(args.url) if args.url else local_url(_process_settings(args).http)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        instances = asyncio.run(fetch_instances(url))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"gateway: cannot get the status from {url}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    print(format_status(instances))
    return EXIT_OK


def _send(args: argparse.Namespace) -> int:
    import aiohttp

    from gateway.config.process import TOKEN_VARIABLE
    from gateway.ops import check_url, local_url, post_message

    process = _process_settings(args)
    token = process.http.token
    if not token:
        print(
            f"gateway: no API token: set {TOKEN_VARIABLE} (or [http] token in gateway.toml)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        url = check_url(args.url) if args.url else local_url(process.http)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    text = sys.stdin.read() if args.text == "-" else args.text
    body = {
        "to": args.to,
        "text": text,
        "target": "user" if args.user else "conversation",
        "format": "markdown" if args.markdown else "text",
    }
    if args.title:
        body["title"] = args.title
    if args.key:
        body["idempotency_key"] = args.key
    try:
        status, answer = asyncio.run(post_message(url, token.reveal(), args.instance, body))
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        print(f"gateway: cannot reach the gateway at {url}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    if status != 200:
        print(f"gateway: send failed (HTTP {status}): {answer.get('error', '')}", file=sys.stderr)
        return EXIT_FAILURE
    how = "already sent (idempotency key)" if answer.get("replayed") else "sent"
    ids = ", ".join(str(i) for i in answer.get("message_ids", []) if i) or "-"
    print(f"{how}: {answer.get('parts', 0)} part(s) to {args.to} via {args.instance} [{ids}]")
    return EXIT_OK


def _http_override(args: argparse.Namespace, process: ProcessSettings) -> ProcessSettings:
    """``--http HOST:PORT`` / ``--no-http`` over the ``[http]`` table."""
    import attrs

    from gateway.ops import parse_address

    if getattr(args, "no_http", False):
        return attrs.evolve(process, http=attrs.evolve(process.http, enabled=False))
    if getattr(args, "http", None):
        try:
            host, port = parse_address(args.http)
        except ValueError as exc:
            raise ConfigError([ConfigProblem("--http", "", str(exc))]) from exc
        http = attrs.evolve(process.http, enabled=True, host=host, port=port)
        return attrs.evolve(process, http=http)
    return process


class _ReloadSignal:
    """SIGHUP for the whole of ``gateway run``: installed before anything else, never removed.

    SIGHUP's default action ends the process, and an asyncio signal handler covers only the time
    the event loop runs (``loop.close()`` restores the default), so a ``systemctl reload`` during
    start-up or during a graceful stop would kill the gateway mid-answer.  A request during
    start-up is kept and carried out once the instances are up (the folder may have changed after
    it was read); one while stopping is logged and ignored.  The handler itself only records the
    request or hands it to the loop: logging inside a signal handler can hit a stream in the middle
    of a write.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloader: Reloader | None = None
        self._early = False  # requested before the reloader was running
        self._stopping = False

    def install(self) -> None:
        signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: object) -> None:
        if self._loop is None:  # still reading the configs
            self._early = True
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to reload
            self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        if self._stopping:
            log.warning("SIGHUP received while stopping: reload ignored")
        elif self._reloader is None:
            self._early = True
        else:
            self._reloader.request()

    def loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def running(self, reloader: Reloader) -> None:
        """The gateway is up: reloads go to ``reloader`` from now on."""
        self._reloader = reloader
        if self._early and not self._stopping:
            log.info("SIGHUP received during start-up: reloading now that the gateway is running")
            reloader.request()

    def stopping(self) -> None:
        self._stopping = True
        self._reloader = None


def _run(args: argparse.Namespace) -> int:
    reload_signal = _ReloadSignal()
    reload_signal.install()
    process, configs, registry = _load(args)
    process = _http_override(args, process)
    _setup_logging(args, process)
    _warn_broken_plugins(registry)
    if not any(c.enabled for c in configs):
        log.warning("no enabled instance in %s; waiting for a signal", args.instances)
    pidfile = PidFile(process.state_path)
    try:
        pidfile.acquire()
    except AlreadyRunning as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_serve(process, configs, args.instances, reload_signal))
    finally:
        pidfile.release()


def _reload(args: argparse.Namespace) -> int:
    _setup_logging(args)
    process = _process_settings(args)
    pid = running_pid(process.state_path)
    if pid is None:
        print(
            f"gateway: no gateway is running on the state directory {process.state_path}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"gateway: cannot signal the gateway (pid {pid}): {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"reload requested (pid {pid}); the gateway logs the outcome")
    return EXIT_OK


async def _serve(
    process: ProcessSettings,
    configs: list[InstanceConfig],
    instances: Path,
    reload_signal: _ReloadSignal,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            reload_signal.stopping()
            log.info(
                "%s received: finishing answers in flight (up to %g s); signal again to exit now",
                signal.Signals(signum).name,
                process.shutdown_grace,
            )
            stop.set()
        else:
            log.warning("second signal: exiting now")
            # Answers in flight are resumed from the inbox on the next start.
            os._exit(EXIT_FAILURE)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    reload_signal.loop_started(loop)

    gateway = await Gateway.open(process)
    ops = await start_ops(gateway, process.http)
    reloader = Reloader(gateway, instances)
    try:
        await gateway.start_all(configs)
        reloader.start()
        log.info("gateway running with %d instance(s)", len(gateway.instances))
        reload_signal.running(reloader)
        await stop.wait()
    finally:
        reload_signal.stopping()
        await reloader.close()
        if ops is not None:
            await ops.close()
        await gateway.close()
        log.info("gateway stopped")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
