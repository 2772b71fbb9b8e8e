"""Any-pair asynchronous messages between instances, the router and the gManager."""
