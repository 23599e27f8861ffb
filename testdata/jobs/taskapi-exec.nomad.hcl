# The Task API example on the exec driver: the task runs in its own network namespace with
# only loopback (network mode "none"), so the agent's HTTP address is out of its reach and the
# socket in its secrets dir is its one way in. curl is the node's own, seen read-only through
# the task's chroot (the client's chroot_env).
job "taskapi-exec" {
  type = "batch"

  group "taskapi-exec" {
    network {
      mode = "none"
    }

    task "taskapi-exec" {
      driver = "exec"

      config {
        command = "curl"
        args = [
          "--unix-socket", "${NOMAD_SECRETS_DIR}/api.sock",
          "-H", "Authorization: Bearer ${NOMAD_TOKEN}",
          "--data-binary", "{\"Meta\": {\"example\": \"Hello World!\"}}",
          "--fail-with-body",
          "--verbose",
          "localhost/v1/client/metadata",
        ]
      }

      identity {
        env = true
      }
    }
  }
}
