"""Built-in plugins. They are registered exactly like third-party ones (entry-point group ``eqat``)."""
