"""gateway/processes: [server] workers > 1 through real `gateway serve` processes."""
