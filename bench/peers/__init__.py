"""The same caller-identification node written on the Python FastAGI libraries a user could
pick instead of ours: `panoramisk_node` (panoramisk 1.4, asyncio) and `pystrix_node` (pystrix
1.3, threads), and `run`, which drives them and our embedded gateway side by side with our
load generator (`python -m bench.peers.run`). Each module's docstring reviews it for
fairness. The libraries are the `peers` extra: `pip install -e '.[peers]'`.
"""
