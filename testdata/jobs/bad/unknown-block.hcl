job "unknown" {
  group "g" {
    task "t" {
      driver = "raw_exec"
      frobnicate {
        level = 11
      }
    }
  }
}
