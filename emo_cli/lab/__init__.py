"""The demo-model lab: the offline corpus, tiny-model pretraining and `emo demo`."""
