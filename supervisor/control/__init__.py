"""The control plane: the API server on a unix socket, the `supervise ctl` client, and metrics."""
