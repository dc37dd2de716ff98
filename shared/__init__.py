"""Models and names shared by the gateway and the resolvers.

Everything here is pure data and contracts: enums, pydantic models, ports (protocols) and
the RabbitMQ/Redis names. No I/O happens at import time and nothing here talks to a socket,
except the config sources in `node_sources`, which read files or Redis when asked.
"""
