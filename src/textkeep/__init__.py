"""textkeep: keep a text LLM's competence when you teach it speech."""

__version__ = "0.1.0"
