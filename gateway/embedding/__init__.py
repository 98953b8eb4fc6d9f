"""The embedding use case: from a decoded request and the caller's key to vectors (pipeline, cache, gateway state)."""
