"""Integration tests that bring up parts of their own (a private RabbitMQ cluster, say)."""
