# A single-machine agent running both a server and a client, like -dev but persistent.
data_dir  = "/var/lib/nomad-client"
bind_addr = "127.0.0.1"
log_level = "debug"

ports {
  http = 4646
}

server {
  enabled = true
}

client {
  enabled = true
}
