"""The processes of `[server] workers` > 1: the supervisor, the front workers and the runtime process."""
