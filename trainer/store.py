"""The label store is filterd.store.labels (the console's learn buttons write it too, and the daemon never imports
the trainer). The trainer imports it from there; these names stay here only for the tests and benchmarks that
still import them from trainer.store."""

from filterd.store.labels import MAX_TEXT_CHARS, LabelStore, message_id

__all__ = ["MAX_TEXT_CHARS", "LabelStore", "message_id"]
