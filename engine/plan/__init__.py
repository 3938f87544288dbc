"""Planning: ADQL, the TAP client, paging and plan tables."""
