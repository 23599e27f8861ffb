# What `nomad job init` writes, for raw_exec: a small HTTP server on a dynamic port, with a
# service and an http check, rolled out one allocation at a time. Nomad's example runs
# redis in docker; everything else (update, migrate, restart, ephemeral_disk, identity,
# resources) is the same, but for the task's shutdown_delay and the ui block.
job "example" {
  datacenters = ["*"]
  type        = "service"

  # Replace one allocation at a time; a new one must be running for 10s before the next.
  update {
    max_parallel      = 1
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
    auto_revert       = false
    canary            = 0
  }

  # How allocations move off a draining node.
  migrate {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "5m"
  }

  group "web" {
    count = 1

    network {
      port "http" {}
    }

    service {
      name     = "example-web"
      tags     = ["global", "web"]
      port     = "http"
      provider = "nomad"

      check {
        name     = "alive"
        type     = "http"
        path     = "/"
        interval = "10s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 2
      interval = "30m"
      delay    = "15s"
      mode     = "fail"
    }

    ephemeral_disk {
      size = 300
    }

    task "server" {
      driver = "raw_exec"

      config {
        command = "python3"
        args    = ["-m", "http.server", "${NOMAD_PORT_http}", "--bind", "${NOMAD_IP_http}",
                   "--directory", "${NOMAD_TASK_DIR}"]
      }

      identity {
        env  = true
        file = true
      }

      resources {
        cpu    = 100 # MHz
        memory = 64  # MB
      }
    }
  }
}
