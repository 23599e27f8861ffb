# Write dynamic node metadata (POST /v1/client/metadata), as the Task API example does.
node {
  policy = "write"
}
