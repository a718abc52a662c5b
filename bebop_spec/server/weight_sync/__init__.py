"""Weight sync: safetensors decoding and checks, and the distributed weight-update group."""
