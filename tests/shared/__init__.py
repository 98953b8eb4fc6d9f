"""gateway/shared: API keys' limits, in-process and over Redis."""
