"""`medseg` run in the test's own process, as the shell would see it."""

from __future__ import annotations

import logging

from medseg.cli import main


def run_in_process(argv, capsys, caplog) -> tuple[int, str]:
    """main(argv) as the shell would see it: (exit status, stderr + log)."""
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="medseg"):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's own errors
            rc = exit_.code
    return rc, capsys.readouterr().err + caplog.text
