"""`python -m procctl` and the `procctl` command.

The operator's signals are held from the first line, before the command line
and its dependencies load, so that a Ctrl-C, SIGTERM or SIGHUP at any moment reaches
the command's handlers (cli.main installs them, then lets the signals in).
"""

import atexit
import signal

#: threads.MANAGED_SIGNALS, spelt out: blocked before anything is imported (a test keeps the two equal).
HELD = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGTTIN, signal.SIGTTOU})


def main() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    _no_bytecode_under_a_size_limit()
    from .clitools import late_signal_status

    atexit.register(late_signal_status)  # before any other: the last to run at exit
    from .cli import main as cli_main

    cli_main()


def _no_bytecode_under_a_size_limit() -> None:
    """Under a file size limit (`ulimit -f`), CPython caches a .pyc cut short
    at the limit (its write is not checked) and every later import of that
    module fails, in any program: the command, and what it starts, write none."""
    import os
    import resource
    import sys

    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        sys.dont_write_bytecode = True
        os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # (spawn workers: their command line has no -B)


if __name__ == "__main__":
    main()
