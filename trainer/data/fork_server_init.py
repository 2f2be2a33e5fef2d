"""Imported first by the loaders' fork server, and by nothing else: from here on the server and
every worker it forks ignore SIGINT and SIGTERM (`trainer.data.worker_signals` says why).

NOTE: never import this in a training process: it would stop answering Ctrl-C and SIGTERM.
"""

from trainer.data.worker_signals import ignore_stop_signals

ignore_stop_signals()
