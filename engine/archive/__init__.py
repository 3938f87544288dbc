"""Local MAST-shaped archive: TAP service, file server and fault injection."""
