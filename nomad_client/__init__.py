"""nomad_client: a Nomad-style client agent with a per-task Unix-socket API."""
