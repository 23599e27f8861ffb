# Input variables, locals and an indented heredoc script.
variable "greeting" {
  type    = string
  default = "hello"
}

variable "count" {
  type    = number
  default = 1
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

locals {
  job_name = "vars-${var.greeting}"
  message  = "${upper(var.greeting)} from ${local.job_name}"
}

job "vars-locals" {
  name        = local.job_name
  type        = "batch"
  datacenters = var.datacenters

  group "main" {
    count = var.count

    task "script" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args = ["-c", <<-EOF
          echo "${local.message}"
          echo "running in ${NOMAD_ALLOC_DIR} on ${node.unique.name}"
          EOF
        ]
      }

      env {
        GREETING = var.greeting
      }
    }
  }
}
