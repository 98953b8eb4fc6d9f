"""State every process and replica shares: API keys and their limits, the Redis link, a local Redis."""
