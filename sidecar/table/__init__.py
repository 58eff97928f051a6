"""The table being served: reading rules documents (large ones in a child process), the
reloader (the one place the table is replaced), and the decider that every transport asks."""
