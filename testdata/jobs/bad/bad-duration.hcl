job "baddur" {
  group "web" {
    task "t" {
      driver       = "raw_exec"
      kill_timeout = "10 parsecs"
    }
  }
}
