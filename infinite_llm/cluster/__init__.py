"""The cluster: router, gManager service, and starting instances (threads or Ray actors)."""
