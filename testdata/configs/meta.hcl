# A client with static node metadata and a driver option.
data_dir   = "/var/lib/nomad-client"
datacenter = "dc2"
name       = "client-meta"

client {
  enabled = true

  meta {
    rack = "r1"
    tier = "gold"
  }

  options = {
    "driver.raw_exec.enable" = "1"
  }
}
