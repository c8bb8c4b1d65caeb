"""Brokers carry publications between sessions: the in-memory one for one worker, Redis for
more workers and machines. `base.py` states the contract both keep; `cluster.py` states what
a worker knows of the others (one worker alone: `SingleWorker`; in Redis:
`redis_cluster.py`)."""
