"""Container tooling: base images, the project image and the compose stack (tools/container/)."""
