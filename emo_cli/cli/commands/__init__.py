"""One module per `emo` command; each registers its command on the app."""
