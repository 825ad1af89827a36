"""moeserve.v1: generated stubs of moeserve.proto; regenerate with protos/generate.sh, never edit."""
