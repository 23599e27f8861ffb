# The agent's web UI and API over HTTPS on a group port, through the task's own Task API
# socket: `python -m nomad_client.uiproxy` forwards each browser request, with the browser's
# token and nothing else, to $NOMAD_SECRETS_DIR/api.sock. With no certificate configured
# it makes a self-signed one at start (for localhost, 127.0.0.1 and the port's address).
#
# Run it with the agent's own interpreter, e.g.
#   nomad-client job run -var python=/path/to/venv/bin/python ui-proxy.nomad.hcl
variable "python" {
  type        = string
  default     = "python3"
  description = "A Python that can import nomad_client (the agent's own)."
}

job "ui-proxy" {
  type = "service"

  group "ui" {
    count = 1

    network {
      port "https" {}
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"
    }

    task "proxy" {
      driver = "raw_exec"

      config {
        command = var.python
        args = [
          "-m", "nomad_client.uiproxy",
          # Only on the address the port was allocated on.
          "--listen", "${NOMAD_ADDR_https}",
          "--socket", "${NOMAD_SECRETS_DIR}/api.sock",
        ]
      }

      # The proxy acts only with the browser's token: it needs no identity of its own.
      identity {
        env  = false
        file = false
      }

      kill_timeout = "10s"

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
