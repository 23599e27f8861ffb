# A long-running service used to exercise restarts, stop and log streaming.
job "sleep" {
  type        = "service"
  datacenters = ["*"]

  meta {
    owner   = "ops"
    purpose = "demo"
  }

  group "sleep" {
    count = 1

    restart {
      attempts = 2
      interval = "5m"
      delay    = "5s"
      mode     = "fail"
    }

    task "sleep" {
      driver = "raw_exec"

      config {
        command = "/bin/sleep"
        args    = ["3600"]
      }

      kill_timeout = "10s"

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
