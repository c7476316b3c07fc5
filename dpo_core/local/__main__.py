"""`python -m dpo_core.local serve [--host 127.0.0.1] [--port N] [--storage DIR] [--api-key tml-...]
[--stand-in tinker]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpo_core.settings import Settings, apply_offline_env


def main(argv: list[str] | None = None) -> int:
    from dpo_core.config_docs import settings_help

    parser = argparse.ArgumentParser(prog="python -m dpo_core.local",
                                     description="Local Tinker-compatible server (tinker SDK 0.38 protocol).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("help", help="show serve's options and settings")
    serve = sub.add_parser(
        "serve", help="serve until interrupted", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the Tinker protocol on loopback until interrupted; prints the URL and the key to export.",
        epilog="settings (environment variables, or a .env file; docs/configuration.md has them all):\n"
               + settings_help("local_"))
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1: loopback only)")
    serve.add_argument("--port", type=int, default=None, help="port (default: settings, 0 = a free one)")
    serve.add_argument("--storage", type=Path, default=None, help="checkpoint folder (default .dpo_local)")
    serve.add_argument("--api-key", default=None,
                       help="key clients must send (default: $TINKER_API_KEY if it is set, else generated)")
    serve.add_argument("--fault-rate", type=float, default=None,
                       help="answer this fraction of requests with a transient 429/5xx (reliability tests)")
    serve.add_argument("--stand-in", choices=["tinker"], default=None,
                       help="answer like Tinker today: its model lineup, Qwen/Qwen3-8B trained and sampled on a tiny "
                            "random-init Qwen3 with the real tokenizer (rehearse a cloud run offline)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["serve", "--help"] if "help" in argv else argv)  # `help`, `serve help`: serve's
    apply_offline_env()
    settings = Settings()
    if args.stand_in:
        settings = settings.model_copy(update={"local_stand_in": args.stand_in})
    api_key = args.api_key or os.environ.get("TINKER_API_KEY")
    if api_key is not None and not api_key.startswith("tml-"):
        print("error: --api-key must start with 'tml-' (the tinker SDK refuses other keys)", file=sys.stderr)
        return 1
    from dpo_core.local.launcher import require_key_off_loopback, serve_forever

    host = args.host or settings.local_host
    try:
        require_key_off_loopback(host, api_key)  # before binding anything
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve_forever(settings, host,
                  settings.local_port if args.port is None else args.port, args.storage, api_key,
                  settings.local_fault_rate if args.fault_rate is None else args.fault_rate)
    return 0


def _exit_now(code: int) -> None:
    """End the process without interpreter teardown, once the server has shut down.

    By then no job is taken and the engine's job was cancelled; if one step of it could not be interrupted (a
    model still loading), teardown would wait on that thread and could abort inside torch ("terminate called"),
    and under load teardown alone takes seconds. Storage needs no teardown: checkpoints are written to a temp
    folder and swapped in atomically, and leftovers of an unfinished write are cleaned at the next start.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
