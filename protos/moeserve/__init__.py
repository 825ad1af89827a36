"""moe-serve public API protos (generated stubs under versioned subpackages)."""
