"""Brokers carry publications between sessions: the in-memory one for one worker, Redis for
more workers and machines. `base.py` states the contract both keep."""
