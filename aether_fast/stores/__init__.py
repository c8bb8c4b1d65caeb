"""Channel stores keep the channel configs: SQLite in `DATA_DIR` for one worker, Redis for
more workers and machines. `base.py` states the contract both keep (as `brokers/` does for
the brokers)."""
