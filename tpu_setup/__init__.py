"""TPU pod setup and launch tooling (ahead-of-time compilation on a CPU host lands first)."""
