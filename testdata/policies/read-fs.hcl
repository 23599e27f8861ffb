# Read allocation files in the default namespace (the /v1/client/fs endpoints).
namespace "default" {
  capabilities = ["read-fs"]
}
