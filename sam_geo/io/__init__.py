"""Reading scenes and prompt layers, writing outputs."""
