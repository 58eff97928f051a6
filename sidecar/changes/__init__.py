"""Knowing what a change of the rules will do before it lands: the requests to try it on
(read back from logs, or synthetic), and the report of what moves."""
