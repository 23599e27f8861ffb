# The operator's controls of the Task API (each task's ${NOMAD_SECRETS_DIR}/api.sock).
# Combine with a file that enables the client, e.g.
#   nomad-client agent -config testdata/configs/dev.hcl -config testdata/configs/task-api.hcl
# Every key is shown. Values are the defaults unless the comment says "default: ...".
# `kill -HUP <agent pid>` applies a change to this block without restarting the agent.
client {
  task_api {
    # false: no task on this node gets a socket, whatever its namespace or jobspec say.
    enabled = true

    # For tasks whose namespace and jobspec make no choice: "enabled" (they get a socket)
    # or "opt_in" (only tasks with `task_api { enabled = true }` do).
    default_mode = "enabled"

    # "METHOD /path/glob" rules, checked on every Task API request after authentication.
    # METHOD is an HTTP method or *, and * in the path matches anything, / included.
    # A denied rule always wins; a non-empty allowed list admits only what it matches.
    allowed_endpoints = []                                                   # default: []
    denied_endpoints  = ["PUT /v1/client/metadata", "POST /v1/client/metadata"] # default: []

    # Concurrent connections one task may hold on its socket; more are refused.
    max_connections_per_task = 64

    # A token bucket per task: over it, 429 with Retry-After. 0 requests per second: off.
    rate_limit {
      requests_per_second = 100
      burst               = 200
    }

    # One JSON line per Task API request (refusals included), never a secret.
    audit {
      enabled   = true # default: false
      # path    = "/var/log/nomad-client/task-api.log"  # default: <data_dir>/audit/task-api.log
      max_size  = 67108864 # bytes per file before it is rotated (at least 4096)
      max_files = 5        # the file and its rotated copies .1 .. .4
    }

    # Who may connect: "off" (anyone who can reach the socket), "log" (processes outside
    # the task are logged) or "enforce" (they get 403). Root is always allowed.
    peer_credentials = "log"

    # true: a workload identity works only on its own allocation's sockets.
    bind_identity_to_socket = true # default: false

    # Each task's secrets/ directory on its own small tmpfs (noexec), when the agent can.
    secrets_tmpfs = true
  }
}
