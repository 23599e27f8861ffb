# Task API example (raw_exec): same request as the docker version, using the
# host's curl binary.
job "taskapi-example" {
  type = "batch"

  group "taskapi-example" {
    task "taskapi-example" {
      driver = "raw_exec"

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
