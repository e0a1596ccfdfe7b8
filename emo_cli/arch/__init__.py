"""Model architectures: configs, the routing function and the EMO model itself."""
