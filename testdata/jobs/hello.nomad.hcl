# The smallest useful job: print a greeting once and exit.
job "hello" {
  type = "batch"

  group "hello" {
    task "hello" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "echo \"hello from ${NOMAD_TASK_NAME}\""]
      }
    }
  }
}
