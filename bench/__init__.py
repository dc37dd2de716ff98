"""End-to-end benchmark of callerid (`python -m bench.run`): see bench/run.py."""
