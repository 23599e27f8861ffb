# Read node metadata and status (GET /v1/client/metadata, /v1/nodes).
node {
  policy = "read"
}
