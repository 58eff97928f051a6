"""Where rules come from, one module per source (`file`: a rules file and its directory)."""
