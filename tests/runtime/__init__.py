"""gateway/runtime: batching, admission, packing, plugin loading (the core on a fake backend)."""
