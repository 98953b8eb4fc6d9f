"""gateway/base: the config."""
