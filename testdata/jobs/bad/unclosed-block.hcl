job "unclosed" {
  group "g" {
    task "t" {
      driver = "raw_exec"
    }
