# Read jobs and allocations in the default namespace; "read" does not include read-fs.
namespace "default" {
  policy = "read"
}
