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
    from .clitools import late_signal_status

    atexit.register(late_signal_status)  # before any other: the last to run at exit
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
