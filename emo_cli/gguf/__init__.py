"""GGUF files: the layout, a lazy reader, the exporter and emo's GGUF runtime."""
