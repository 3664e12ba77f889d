"""`python -m procctl` and the `procctl` command.

The operator's signals are held from the first line, before the command line
and its dependencies load, so that a Ctrl-C, SIGTERM or SIGHUP at any moment reaches
the command's handlers (cli.main installs them, then lets the signals in).
"""

import atexit
import signal


def main() -> None:
    from .threads import MANAGED_SIGNALS  # (a small module: os, signal, threading)

    signal.pthread_sigmask(signal.SIG_BLOCK, MANAGED_SIGNALS)
    from .clitools import late_signal_status

    atexit.register(late_signal_status)  # before any other: the last to run at exit
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
