"""Data: corpus (sources -> token sequences), harvest (model -> activation shards), shards (writer +
verified reader) and the shuffling, resumable loader."""
