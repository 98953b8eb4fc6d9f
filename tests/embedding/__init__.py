"""gateway/embedding: the use case through HTTP: request path, options, cache, failover."""
