"""What every layer stands on: the config, the errors' shape, the wire types, logs and metrics."""
