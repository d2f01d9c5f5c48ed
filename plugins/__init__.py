"""Built-in plugins. Installed as `engine.plugins` (the folder is plugins/ in the source tree) and
registered through the `tunesmith` entry-point group exactly like third-party plugins."""
