job "nolabel" {
  group {
    task "t" {
      driver = "raw_exec"
    }
  }
}
