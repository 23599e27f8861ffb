# Turns on ACL enforcement; combine with another file that enables server/client.
acl {
  enabled = true
}
