"""The real-PBX tier: tests that drive a private Asterisk 22 (tools/pbx.py)."""
