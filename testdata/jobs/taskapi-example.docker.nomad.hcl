# Task API example (docker): the task writes dynamic node metadata through the
# Unix socket in its secrets directory, authenticated with its workload identity.
job "taskapi-example" {
  type = "batch"

  group "taskapi-example" {
    task "taskapi-example" {
      driver = "docker"

      config {
        image = "curlimages/curl:7.87.0"
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
