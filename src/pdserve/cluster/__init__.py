"""Launchers: a local cluster of subprocesses (``pdserve up``); cluster files; shared engine flags."""
